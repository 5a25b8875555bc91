"""The shared evaluator: one pass over the data, and everything derived from it.

`collect_exit_cache` makes the one pass (every exit's confidence and correctness per sample,
and the exit costs) into an `ExitCache`; `sweep_thresholds` scores any thresholds from it with
inference's own rule. `evaluate` (one threshold, as an `Evaluation`), `earlyexit.tradeoff_curve`
and `earlyexit.calibrate` (many) and the demo all read their numbers from it, so they agree.
`select_exits` applies the same rule to one batch's outputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from earlyexit._modes import set_mode
from earlyexit.inference import check_threshold, exit_mask
from earlyexit.model import EarlyExitNet
from earlyexit.outputs import ExitOutputs

__all__ = [
    "NEVER",
    "Evaluation",
    "ExitCache",
    "collect_exit_cache",
    "evaluate",
    "select_exits",
    "sweep_thresholds",
]

NEVER = 2.0
"""A threshold above 1: no sample leaves early (h_i is at most 1)."""


def _resolve_device(net: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    param = next(iter(net.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a batch as training and evaluation both do: an `(inputs, targets)` tuple or list.

    Items after the second (a dataset's extra fields) are ignored. The inputs must be a tensor;
    the targets may be anything `torch.as_tensor` takes (a tensor, a list of class indices).
    Nothing is moved to a device here.

    Raises:
        TypeError: the batch is not a tuple or list of at least two items, or the inputs are
            not a tensor.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise TypeError(
            "Expected the loader to yield (inputs, targets) pairs, as (x, y) tuples or lists, "
            f"got {type(batch).__name__}. Hint: use a TensorDataset, or wrap the loader, e.g. "
            "`[(b['image'], b['label']) for b in loader]`."
        )
    x, y = batch[0], batch[1]
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"Expected the inputs `x` of an (x, y) batch to be a tensor, got {type(x).__name__}."
        )
    return x, torch.as_tensor(y)


def _total(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass
class Evaluation:
    """What `evaluate` measures on a data set.

    Attributes:
        accuracy: top-1 accuracy of early-exit inference, in [0, 1].
        cost: mean relative cost per sample (1.0 = the original model).
        exit_counts: N+1 ints, how many samples left at each exit (the last is the final exit).
        exit_accuracy: N+1 floats, each exit's own classifier accuracy on all samples, whether
            or not they left there.
        exit_costs: N+1 relative costs c_0 < ... < c_N.
        num_samples: how many samples were evaluated.
        threshold: the threshold T used.
    """

    accuracy: float
    cost: float
    exit_counts: list[int]
    exit_accuracy: list[float]
    exit_costs: list[float]
    num_samples: int
    threshold: float

    @classmethod
    def from_cache(cls, cache: ExitCache, threshold: float) -> Evaluation:
        """The evaluation at threshold T of a pass already made (`collect_exit_cache`)."""
        accuracy, cost, counts = sweep_thresholds(cache, [threshold])
        return cls(
            accuracy=float(accuracy[0]),
            cost=float(cost[0]),
            exit_counts=[int(c) for c in counts[0]],
            exit_accuracy=cache.exit_accuracy.tolist(),
            exit_costs=cache.costs.tolist(),
            num_samples=cache.num_samples,
            threshold=threshold,
        )

    @property
    def num_exits(self) -> int:
        """N, the number of early exits."""
        return len(self.exit_counts) - 1

    def exit_names(self) -> list[str]:
        """Row labels: `exit 0` ... `exit N-1`, then `final`."""
        return [f"exit {i}" for i in range(self.num_exits)] + ["final"]

    def __str__(self) -> str:
        lines = [f"{'':<8} {'cost':>6} {'leave':>7} {'share':>7} {'own acc':>8}"]
        for name, c, n, a in zip(
            self.exit_names(),
            self.exit_costs,
            self.exit_counts,
            self.exit_accuracy,
            strict=True,
        ):
            share = n / self.num_samples if self.num_samples else 0.0
            lines.append(f"{name:<8} {c:>6.3f} {n:>7d} {share:>7.1%} {a:>8.2%}")
        lines.append(
            f"accuracy {self.accuracy:.2%} at mean relative cost {self.cost:.3f} "
            f"(T={self.threshold:g}, {self.num_samples} samples)"
        )
        return "\n".join(lines)


def select_exits(outputs: ExitOutputs, threshold: float) -> torch.Tensor:
    """The exit each sample leaves at under threshold T, from every exit's outputs.

    Args:
        outputs: `forward_all` outputs of a batch.
        threshold: T; a sample leaves at the first exit i with sigmoid(a_i) >= T.

    Returns:
        A `(B,)` long tensor in `[0, N]`, as `EarlyExitNet.early_exit` would give.
    """
    n = len(outputs.confidence_logits)
    batch = outputs.logits[0].shape[0]
    index = torch.full((batch,), n, dtype=torch.long, device=outputs.logits[0].device)
    for i in reversed(range(n)):
        index = torch.where(exit_mask(outputs.confidence_logits[i], threshold), i, index)
    return index


@dataclass
class ExitCache:
    """What one pass over the data keeps: enough to score any threshold without the net.

    `collect_exit_cache` fills it; `evaluate` (one threshold), `earlyexit.tradeoff_curve` and
    `earlyexit.calibrate` (many) are computed from it with `sweep_thresholds`.

    Attributes:
        confidence: `(S, N)` float32, each sample's h_i = sigmoid(a_i) at each early exit, as
            inference compares it with T; a NaN is kept as -inf, which no threshold reaches.
        correct: `(S, N+1)` bool, whether exit i's own classifier is right on each sample.
        costs: `(N+1,)` float64, the relative costs c_0 < ... < c_N.
    """

    confidence: np.ndarray
    correct: np.ndarray
    costs: np.ndarray

    @property
    def num_samples(self) -> int:
        """S, the number of samples."""
        return int(self.correct.shape[0])

    @property
    def exit_accuracy(self) -> np.ndarray:
        """`(N+1,)` float64: each exit's own accuracy on every sample, the final exit's last."""
        return self.correct.mean(axis=0, dtype=np.float64)


def collect_exit_cache(
    net: EarlyExitNet,
    loader: Iterable[Any],
    *,
    device: torch.device | str | None = None,
    progress: bool = True,
    desc: str = "evaluate",
) -> ExitCache:
    """Run every exit on the data once and keep what any threshold needs: an `ExitCache`.

    One `forward_all` per batch under `torch.no_grad`, with the net in eval mode meanwhile;
    afterwards every submodule has its own mode back (a BatchNorm the user put in eval mode
    inside a train-mode net stays so).

    Args:
        net: the early-exit net.
        loader: yields `(x, y)` batches, tuples or lists (items after the second are ignored):
            inputs of shape `(B, *net.input_size)` and class indices of shape `(B,)`.
        device: where to run; the device of the net's parameters when None.
        progress: show a tqdm progress bar.
        desc: the progress bar's label.

    Returns:
        The `ExitCache`, on the CPU.

    Raises:
        TypeError: `net` is not an `EarlyExitNet`, or a batch is not an `(x, y)` pair.
        ValueError: the loader yields no samples, inputs whose shape is not `net.input_size`
            (the costs hold at that size only), or targets that are not one class index per
            sample.
    """
    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")
    device = _resolve_device(net, device)
    expected = tuple(net.input_size)
    confidence: list[torch.Tensor] = []
    correct: list[torch.Tensor] = []
    with set_mode(net, False), torch.no_grad():
        bar = tqdm(loader, desc=desc, total=_total(loader), disable=not progress, leave=False)
        for batch in bar:
            x, y = _unpack(batch)
            if expected and tuple(x.shape[1:]) != expected:
                raise ValueError(
                    f"Expected input batches of shape (B, {', '.join(map(str, expected))}), "
                    f"got {tuple(x.shape)}. Hint: the exit costs hold at the size the "
                    "model was converted at (`net.input_size`); resize the data."
                )
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"Expected targets of shape ({x.shape[0]},) (class indices), got "
                    f"{tuple(y.shape)}. Hint: pass class indices, not one-hot vectors."
                )
            out = net.forward_all(x.to(device, non_blocking=True))
            h = torch.stack([torch.sigmoid(a.float()) for a in out.confidence_logits], 1)
            pred = torch.stack([z.argmax(1) for z in out.logits], 1)
            confidence.append(h)
            correct.append(pred == y.to(pred.device, non_blocking=True).view(-1, 1))
        bar.close()
    if sum(len(c) for c in correct) == 0:
        raise ValueError(
            "Expected a loader with at least one sample, got none (no batches, or empty ones). "
            "Hint: pass a non-empty dataset."
        )
    h = torch.cat(confidence).cpu()
    # A NaN confidence never passes `h >= T`; neither does -inf, which sorts properly.
    h = torch.where(h.isnan(), torch.full_like(h, -math.inf), h)
    return ExitCache(
        confidence=h.numpy(),
        correct=torch.cat(correct).cpu().numpy(),
        costs=net.exit_costs.detach().cpu().double().numpy(),
    )


def sweep_thresholds(
    cache: ExitCache, thresholds: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, mean cost and exit counts of early-exit inference at each threshold.

    Inference's own rule, `h_i >= T` compared in float32 (`earlyexit.inference.exit_mask`),
    applied to the cached confidences. As T grows, a sample's exit only moves later: it leaves
    at exit i for T in (max(h_0..h_{i-1}), h_i], a contiguous range of the sorted thresholds,
    so the whole sweep is one sort, difference arrays and prefix sums.

    Args:
        cache: from `collect_exit_cache`.
        thresholds: the T values, in any order; any T above 1 means no early exit.

    Returns:
        `(accuracy, mean_cost, counts)`: float64 arrays of shape `(K,)` and `(K,)`, and an
        int64 array of shape `(K, N+1)`, how many samples leave at each exit.
    """
    conf, correct = cache.confidence, cache.correct
    samples, n_exits = conf.shape
    # Every T above 1 behaves as NEVER, and NEVER fits in float32 exactly.
    clipped = np.clip(np.asarray(thresholds, np.float64), 0.0, NEVER).astype(np.float32)
    unique, inverse = np.unique(clipped, return_inverse=True)
    inverse = inverse.reshape(-1)
    # Lower ends: the running maximum of the earlier exits' confidences (-inf before exit 0).
    running = np.maximum.accumulate(conf, axis=1)
    lower = np.concatenate([np.full((samples, 1), -np.inf, np.float32), running], axis=1)
    upper = np.concatenate([conf, np.full((samples, 1), np.inf, np.float32)], axis=1)
    lo = np.searchsorted(unique, lower, side="right")
    hi = np.searchsorted(unique, upper, side="right")
    k = len(unique)
    counts = np.zeros((k + 1, n_exits + 1), np.int64)
    hits = np.zeros(k + 1, np.int64)
    exits = np.broadcast_to(np.arange(n_exits + 1), lo.shape)
    live = lo < hi
    np.add.at(counts, (lo[live], exits[live]), 1)
    np.add.at(counts, (hi[live], exits[live]), -1)
    right = live & correct
    np.add.at(hits, lo[right], 1)
    np.add.at(hits, hi[right], -1)
    counts = np.cumsum(counts, axis=0)[:k][inverse]
    hits = np.cumsum(hits)[:k][inverse]
    accuracy = hits / samples
    mean_cost = counts @ cache.costs / samples
    return accuracy, mean_cost, counts


def evaluate(
    net: EarlyExitNet,
    loader: Iterable[Any],
    threshold: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Evaluation:
    """Measure early-exit accuracy and cost, where samples leave, and each exit's own accuracy.

    One `forward_all` pass per batch, in eval mode (the net's mode is restored afterwards). A
    sample's early-exit result is read at the first exit whose confidence reaches the threshold,
    which is what `net.early_exit` returns for it. The same pass (`collect_exit_cache`) feeds
    `earlyexit.tradeoff_curve` and `earlyexit.calibrate`, so their numbers agree.

    Args:
        net: the early-exit net.
        loader: yields `(inputs, targets)` batches, tuples or lists (items after the second
            are ignored): inputs of shape `(B, *net.input_size)`, targets class indices.
        threshold: T; the net's own `threshold` when None.
        device: where to run; the device of the net's parameters when None.
        progress: show a tqdm progress bar.

    Returns:
        An `Evaluation`; `print` it for a table.

    Raises:
        TypeError: `net` is not an `EarlyExitNet`, or the loader yields something else than
            `(inputs, targets)`.
        ValueError: a bad threshold, an empty loader, inputs whose shape is not
            `net.input_size`, or targets that are not one class index per sample.

    Example:
        >>> import timm, torch, earlyexit
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> from earlyexit.evaluation import evaluate
        >>> net = earlyexit.convert(timm.create_model("resnet8", width=2), n_exits=2)
        >>> data = TensorDataset(torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,)))
        >>> result = evaluate(net, DataLoader(data, batch_size=8), progress=False)
        >>> result.num_samples, sum(result.exit_counts), len(result.exit_accuracy)
        (16, 16, 3)
    """
    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")
    t = net.threshold if threshold is None else check_threshold(threshold)
    cache = collect_exit_cache(net, loader, device=device, progress=progress, desc="evaluate")
    return Evaluation.from_cache(cache, t)
