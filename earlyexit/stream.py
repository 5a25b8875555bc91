"""Streaming early-exit inference: per-stage queues keep every stage at a full batch.

`EarlyExitNet.early_exit` shrinks the batch at every exit, so the late stages run on a few
samples. `predict` keeps one queue per stage instead: the samples that stay after exit i wait in
queue i+1 until a full batch is there, new input batches keep stage 0 fed, and the queues are
flushed at the end of the data. Each sample's result is the one `early_exit` gives it alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from earlyexit._pipeline import Pipeline
from earlyexit.cuda_graphs import GraphedEarlyExit, capture_cuda_graphs
from earlyexit.inference import check_threshold
from earlyexit.model import EarlyExitNet, check_eval_net
from earlyexit.outputs import EarlyExitResult

__all__ = ["Prediction", "predict"]


@dataclass(frozen=True, eq=False)
class Prediction:
    """What `predict` returns: every sample's early-exit result, in input order, on the CPU.

    Attributes:
        logits: `(S, num_classes)` class logits, each sample's from the exit it left at, in the
            dtype of the net's logits.
        exit_index: `(S,)` long tensor in `[0, N]`; N is the final exit.
        cost: `(S,)` float tensor, `exit_costs[exit_index]`.
        targets: `(S,)` the targets, for data of `(inputs, targets)` pairs; None otherwise.
        accuracy: top-1 accuracy of `logits` against `targets`, in [0, 1]; None without targets.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    cost: torch.Tensor
    targets: torch.Tensor | None = None
    accuracy: float | None = None

    @property
    def num_samples(self) -> int:
        """S, the number of samples."""
        return self.logits.shape[0]

    @property
    def mean_cost(self) -> float:
        """The mean relative cost per sample (1.0 = the original model)."""
        return float(self.cost.double().mean())

    @property
    def result(self) -> EarlyExitResult:
        """`EarlyExitResult(logits, exit_index, cost)`, as `net.early_exit` returns for a batch."""
        return EarlyExitResult(self.logits, self.exit_index, self.cost)

    def __repr__(self) -> str:
        accuracy = "None" if self.accuracy is None else f"{self.accuracy:.4f}"
        return (
            f"Prediction(num_samples={self.num_samples}, accuracy={accuracy}, "
            f"mean_cost={self.mean_cost:.4f})"
        )


def _unpack(
    batch: Any, k: int, input_size: tuple[int, ...]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Batch `k`'s inputs and targets (None when it has none), checked."""
    y = None
    if isinstance(batch, (list, tuple)) and batch:
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x = batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"Expected batch {k} of `data` to be a tensor or an (inputs, targets) pair, got "
            f"{type(batch).__name__}. Hint: pass a DataLoader, or a list of tensors."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"Expected batch {k} of `data` to hold floating-point inputs, got {x.dtype}. Hint: "
            "convert and normalize them as for the original model (e.g. `x.float() / 255`)."
        )
    if input_size and tuple(x.shape[1:]) != input_size:
        raise ValueError(
            f"Expected batch {k} of `data` to have shape (B, {', '.join(map(str, input_size))}) "
            f"(`net.input_size`), got {tuple(x.shape)}. Hint: resize the inputs to the size "
            "the net was converted at."
        )
    if y is not None:
        y = torch.as_tensor(y)
        if y.shape != x.shape[:1]:
            raise ValueError(
                f"Expected batch {k} of `data` to have one target per input, got targets of "
                f"shape {tuple(y.shape)} for {x.shape[0]} inputs. Hint: targets are class "
                "indices."
            )
    return x, y


def _check_batch_size(batch_size: object) -> None:
    if batch_size is None:
        return
    if isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise TypeError(f"Expected `batch_size` to be a positive int, got {batch_size!r}.")
    if batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int, got {batch_size!r}.")


def _process_group() -> tuple[int, int]:
    """This process's rank and the world size: (0, 1) unless torch.distributed is set up."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _graphs_for(
    net: EarlyExitNet, cuda_graphs: bool | GraphedEarlyExit, size: int
) -> GraphedEarlyExit | None:
    """The graphs `predict` runs at batch `size`: captured now, given, or none (eager)."""
    if not isinstance(cuda_graphs, GraphedEarlyExit):
        return capture_cuda_graphs(net, (size,)) if cuda_graphs else None
    largest = max(cuda_graphs.batch_sizes)
    if size > largest:
        raise ValueError(
            f"Expected a `batch_size` the given CUDA graphs hold, at most {largest} (they "
            f"were captured at {list(cuda_graphs.batch_sizes)}), got {size}. Hint: capture "
            f"them with `earlyexit.capture_cuda_graphs(net, {size})`, or pass a smaller "
            "`batch_size`."
        )
    cuda_graphs._prepare()
    return cuda_graphs


def _predict_shard(
    net: EarlyExitNet,
    data: Iterable[Any],
    batch_size: int | None,
    threshold: float,
    device: torch.device,
    progress: bool,
    rank: int,
    world: int,
    cuda_graphs: bool | GraphedEarlyExit = False,
) -> tuple[EarlyExitResult, torch.Tensor | None, int]:
    """This rank's share of the stream: its results, its targets, and the stream's length."""
    input_size = tuple(net.input_size)
    pipeline: Pipeline | None = None
    labelled: bool | None = None
    targets: list[torch.Tensor] = []
    total = count = 0  # samples in the stream, and in this rank's share of it
    disable = None if progress and rank == 0 else True  # None: off when stderr is no terminal
    bar = tqdm(data, desc="predict", unit="batch", leave=False, disable=disable)
    with torch.inference_mode():
        try:
            for k, batch in enumerate(bar):
                x, y = _unpack(batch, k, input_size)
                if labelled is None:
                    labelled = y is not None
                elif labelled != (y is not None):
                    which = (
                        "no targets but batch 0 has" if labelled else "targets but batch 0 has none"
                    )
                    raise TypeError(
                        f"Expected all batches of `data` to have targets, or none; batch {k} has "
                        f"{which}. Hint: yield (inputs, targets) pairs throughout, or inputs only."
                    )
                if x.shape[0] == 0:
                    continue
                if pipeline is None:
                    size = batch_size or x.shape[0]
                    # the input's device may not be the one it runs on
                    micro = net.resolve_micro_batch(x) if device.type == "cpu" else None
                    size = size if micro is None else min(size, micro)
                    graphs = _graphs_for(net, cuda_graphs, size)
                    stages = net._inference_stages(chained=True)
                    pipeline = Pipeline(stages, net._inference_heads(), threshold, size, graphs)
                # DistributedSampler's order: sample j of the stream goes to rank j % world.
                mine = slice((rank - total) % world, None, world)
                total += x.shape[0]
                x = x[mine]
                if y is not None:
                    targets.append(y[mine].cpu())
                ids = torch.arange(count, count + x.shape[0], device=device)
                count += x.shape[0]
                pipeline.push(x.to(device, non_blocking=True), ids)
            if pipeline is None:
                raise ValueError(
                    "Expected `data` to hold at least one sample, got none. Hint: check the "
                    "data set and the loader's `drop_last`."
                )
            pipeline.flush()
        finally:
            bar.close()
    # Outside inference mode: the user gets ordinary tensors.
    result = pipeline.result(count, net.exit_costs, net.num_classes)
    return result, (torch.cat(targets) if labelled else None), total


def _interleave(parts: Sequence[torch.Tensor], total: int) -> torch.Tensor:
    """Undo the sharding: rank r's k-th sample is sample r + k * world of the stream."""
    out = parts[0].new_empty((total, *parts[0].shape[1:]))
    for r, part in enumerate(parts):
        out[r :: len(parts)] = part
    return out


def _gather(
    result: EarlyExitResult, targets: torch.Tensor | None, total: int, rank: int, world: int
) -> tuple[EarlyExitResult, torch.Tensor | None]:
    """Every rank's share, in stream order, on rank 0; the other ranks keep their own."""
    shards: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object((result, targets), shards, dst=0)
    if shards is None:
        return result, targets
    results = [r for r, _ in shards]
    merged = EarlyExitResult(*(_interleave([r[f] for r in results], total) for f in range(3)))
    return merged, (_interleave([t for _, t in shards], total) if targets is not None else None)


def predict(
    net: EarlyExitNet,
    data: Iterable[Any],
    *,
    batch_size: int | None = None,
    threshold: float | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    cuda_graphs: bool | GraphedEarlyExit = False,
) -> Prediction:
    """Early-exit inference over a stream of batches, with every stage run at a full batch.

    `net.early_exit` shrinks the batch at each exit, so the late stages run on small batches.
    Here the samples that stay after exit i wait in a queue for stage i+1 until `batch_size`
    of them are there; new input batches keep stage 0 fed, and the queues are flushed (partial
    batches) at the end of the data. The deepest stage with a full batch runs first, so each
    queue holds less than two batches (the first: less than one batch plus an input batch).
    A sample's result is the one `net.early_exit` gives it alone, whatever the batch size and
    the rest of the stream; the price is latency: a sample may wait in a queue until a batch
    fills, so the first results are only known at the end.

    Under `torch.distributed` (e.g. `torchrun`), every rank must iterate the same data; rank r
    runs samples r, r + W, r + 2W, ... of the stream (W the world size, DistributedSampler's
    order, without padding), and rank 0 gathers all the results, in stream order. The other
    ranks return the results of their own samples only, in that order. With NCCL, set each
    rank's CUDA device (`torch.cuda.set_device`) first.

    Args:
        net: the early-exit net, in eval mode.
        data: an iterable of input batches `(B, C, H, W)` at `net.input_size`, or of
            `(inputs, targets)` pairs (e.g. a DataLoader); extra items of a pair are ignored.
        batch_size: the batch each stage runs at (per rank); the size of the first input batch
            when None. On the CPU, at most `net.micro_batch` (see there).
        threshold: T; the net's own `threshold` when None.
        device: where to run (inputs are moved there); the device of the net's parameters when
            None.
        progress: show a progress bar over the input batches (only when stderr is a terminal,
            and only on rank 0).
        cuda_graphs: True: run each stage, with its exit, as a CUDA graph captured for this
            call at `batch_size` (see `earlyexit.capture_cuda_graphs`); partial batches are
            padded to it. Needs the net on a CUDA device. Or the runner that
            `earlyexit.capture_cuda_graphs(net, sizes)` returned, to reuse its graphs over
            many calls without capturing again: `batch_size` must be at most its largest
            size, and a partial batch runs at the smallest captured size that holds it.

    Returns:
        A `Prediction`: logits, exit indices and costs of all the samples in input order, on
        the CPU, and for labelled data the targets and the top-1 accuracy.

    Raises:
        TypeError: `net` is not an `EarlyExitNet`, `data` is a single tensor, a batch is not
            a floating-point tensor or a pair, or `batch_size` is not an int.
        ValueError: the net is in train mode, `data` holds no samples, a batch has the wrong
            shape, `batch_size` or `threshold` is out of range, or the given CUDA graphs are
            another net's or too small for `batch_size`.
        EarlyExitError: with `cuda_graphs=True`, the net is not on a CUDA device or a stage
            cannot be captured (`earlyexit.capture_cuda_graphs` says which); with a runner,
            the net's parameters moved since its capture.

    Example:
        >>> import timm, torch, earlyexit
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
        >>> data = TensorDataset(torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,)))
        >>> pred = earlyexit.predict(net, DataLoader(data, batch_size=8), progress=False)
        >>> pred.logits.shape, pred.exit_index.shape, pred.targets.shape
        (torch.Size([20, 10]), torch.Size([20]), torch.Size([20]))
        >>> 0.0 <= pred.accuracy <= 1.0 and pred.mean_cost > 0
        True
    """
    check_eval_net(net, "its stages would use dropout and batch statistics")
    if isinstance(data, torch.Tensor):
        raise TypeError(
            "Expected `data` to be an iterable of batches, got a single tensor. Hint: pass "
            "`[x]` for one batch, or `x.split(64)` for batches of 64."
        )
    _check_batch_size(batch_size)
    if isinstance(cuda_graphs, GraphedEarlyExit):
        if cuda_graphs.net is not net:
            raise ValueError(
                "Expected CUDA graphs captured from `net`, got graphs of another net. Hint: "
                "pass `earlyexit.capture_cuda_graphs(net, batch_size)` for this net."
            )
    elif not isinstance(cuda_graphs, bool):
        raise TypeError(
            "Expected `cuda_graphs` to be a bool or the runner of "
            f"`earlyexit.capture_cuda_graphs`, got {cuda_graphs!r}."
        )
    t = net.threshold if threshold is None else check_threshold(threshold)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    rank, world = _process_group()
    result, targets, total = _predict_shard(
        net, data, batch_size, t, device, progress, rank, world, cuda_graphs
    )
    if world > 1:
        result, targets = _gather(result, targets, total, rank, world)
    accuracy = None
    if targets is not None:
        hits = result.logits.argmax(dim=1) == targets
        accuracy = float(hits.double().mean())
    return Prediction(
        logits=result.logits,
        exit_index=result.exit_index,
        cost=result.cost,
        targets=targets,
        accuracy=accuracy,
    )
