"""The threshold ↔ cost/accuracy trade-off, and picking a threshold that meets a budget.

Both run the evaluator that `earlyexit.evaluate` runs: one pass over the data
(`earlyexit.evaluation.collect_exit_cache`) keeps, per sample, each early exit's confidence
h_i = sigmoid(a_i) (in float32, as inference computes it) and whether each exit's classifier is
right. Every threshold is then scored from that cache with inference's own rule, a sample leaves
at the first exit with h_i ≥ T (`earlyexit.evaluation.sweep_thresholds`): a whole curve, even
over every observed confidence value, is one sort and a few prefix sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from earlyexit.evaluation import NEVER, ExitCache, collect_exit_cache, sweep_thresholds
from earlyexit.inference import check_threshold
from earlyexit.model import EarlyExitNet

__all__ = [
    "DEFAULT_THRESHOLDS",
    "NEVER",
    "TradeoffCurve",
    "calibrate",
    "fit_exit_thresholds",
    "plot_tradeoff",
    "score_exit_thresholds",
    "set_exit_thresholds",
    "tradeoff_curve",
]

DEFAULT_THRESHOLDS: tuple[float, ...] = (*(round(0.05 * k, 2) for k in range(21)), NEVER)
"""0, 0.05, ..., 0.95, 1.0 and `NEVER`; includes the paper's T = 0.5."""

PAPER_THRESHOLD = 0.5


@dataclass
class TradeoffCurve:
    """Accuracy, mean cost and where samples leave, for each of a list of thresholds.

    Attributes:
        thresholds: the T values, in the order asked for.
        accuracy: per threshold, the accuracy of early-exit inference.
        mean_cost: per threshold, the mean relative cost per sample (1.0 = the original model).
        exit_counts: per threshold, how many samples leave at each of the N+1 exits.
        exit_accuracy: the N+1 accuracies of each exit's own classifier on every sample; the
            last is the original model's (no early exits).
        exit_costs: the N+1 relative costs c_0 < ... < c_N.
        num_samples: the number of samples the curve was measured on.
    """

    thresholds: list[float]
    accuracy: list[float]
    mean_cost: list[float]
    exit_counts: list[list[int]]
    exit_accuracy: list[float]
    exit_costs: list[float]
    num_samples: int

    @classmethod
    def from_cache(cls, cache: ExitCache, thresholds: Sequence[float]) -> TradeoffCurve:
        """The curve of a pass already made (`earlyexit.evaluation.collect_exit_cache`).

        Args:
            cache: every exit's confidence and correctness per sample, and the costs.
            thresholds: the T values, already checked (`check_threshold`).

        Returns:
            The `TradeoffCurve`, the thresholds in the order given.
        """
        values = list(thresholds)
        accuracy, mean_cost, counts = sweep_thresholds(cache, values)
        return cls(
            thresholds=values,
            accuracy=accuracy.tolist(),
            mean_cost=mean_cost.tolist(),
            exit_counts=counts.tolist(),
            exit_accuracy=cache.exit_accuracy.tolist(),
            exit_costs=cache.costs.tolist(),
            num_samples=cache.num_samples,
        )

    @property
    def reference_accuracy(self) -> float:
        """The accuracy without early exits (the final exit on every sample)."""
        return self.exit_accuracy[-1]

    def to_rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per threshold.

        Returns:
            Dicts with `threshold`, `accuracy`, `mean_cost`, `speedup` (c_N / mean cost) and
            `exit_counts`.
        """
        c_n = self.exit_costs[-1]
        return [
            {
                "threshold": t,
                "accuracy": a,
                "mean_cost": c,
                "speedup": c_n / c if c > 0 else math.inf,
                "exit_counts": list(n),
            }
            for t, a, c, n in zip(
                self.thresholds, self.accuracy, self.mean_cost, self.exit_counts, strict=True
            )
        ]

    def __str__(self) -> str:
        n_exits = len(self.exit_costs)
        header = f"{'T':>6} {'accuracy':>9} {'cost':>7} {'speedup':>8}  share leaving at exit 0..N"
        lines = [header]
        for row in self.to_rows():
            t = row["threshold"]
            label = "never" if t > 1 else f"{t:.3f}".rstrip("0").rstrip(".") or "0"
            shares = " ".join(
                f"{100 * k / max(self.num_samples, 1):5.1f}" for k in row["exit_counts"]
            )
            lines.append(
                f"{label:>6} {100 * row['accuracy']:8.2f}% {row['mean_cost']:7.4f} "
                f"{row['speedup']:7.2f}x  {shares}"
            )
        per_exit = " ".join(f"{100 * a:.1f}" for a in self.exit_accuracy)
        costs = " ".join(f"{c:.3f}" for c in self.exit_costs)
        lines.append(f"{self.num_samples} samples, {n_exits} exits; exit costs: {costs}")
        lines.append(f"each exit's own accuracy (%): {per_exit}")
        return "\n".join(lines)


def tradeoff_curve(
    net: EarlyExitNet,
    loader: Iterable[Any],
    thresholds: Sequence[float] | None = None,
    *,
    progress: bool = True,
) -> TradeoffCurve:
    """Measure accuracy, mean cost and the exit histogram per threshold, from one pass.

    The net runs in eval mode under `torch.no_grad` (its mode is restored afterwards).

    Args:
        net: the early-exit network.
        loader: yields `(x, y)` batches: inputs of shape `(B, *net.input_size)` and class
            indices of shape `(B,)`. A `DataLoader` or any re-iterable of pairs.
        thresholds: the T values; `DEFAULT_THRESHOLDS` (0 to 1 by 0.05, and never) when None.
        progress: show a progress bar over the batches.

    Returns:
        The `TradeoffCurve`.

    Raises:
        TypeError: when `net` is not an `EarlyExitNet` or a batch is not an `(x, y)` pair.
        ValueError: for negative thresholds, an empty loader, or inputs whose shape is not
            `net.input_size` (the costs hold at that size only).

    Example:
        >>> import timm, torch, earlyexit
        >>> from earlyexit.calibrate import tradeoff_curve
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2)
        >>> data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
        >>> curve = tradeoff_curve(net, data, thresholds=[0.0, 0.5, 2.0], progress=False)
        >>> curve.exit_counts[0], curve.exit_counts[-1]
        ([8, 0, 0], [0, 0, 8])
    """
    values = list(DEFAULT_THRESHOLDS if thresholds is None else thresholds)
    values = [check_threshold(t) for t in values]
    if not values:
        raise ValueError("Expected at least one threshold, got an empty list.")
    cache = collect_exit_cache(net, loader, progress=progress, desc="calibrating")
    return TradeoffCurve.from_cache(cache, values)


def calibrate(
    net: EarlyExitNet,
    loader: Iterable[Any],
    target_cost: float | None = None,
    max_accuracy_drop: float | None = None,
    *,
    per_exit: bool = False,
    progress: bool = True,
) -> float:
    """Pick the threshold that meets a budget on the given data, and set it on the net.

    Give exactly one budget. With `target_cost`, the threshold with the highest accuracy whose
    mean cost is at most the target; with `max_accuracy_drop`, the one with the lowest mean cost
    whose accuracy is at most that much below the accuracy without early exits. Every distinct
    behaviour on the data is considered (each observed confidence value is a candidate). The
    value returned lies midway between the confidence that decides it and the next lower one,
    so it behaves the same on this data and keeps a margin for new data.

    Args:
        net: the early-exit network; its `threshold` is set to the result.
        loader: yields `(x, y)` batches, as for `tradeoff_curve`; use held-out data.
        target_cost: the largest mean relative cost allowed, in `[c_0, c_N]` (`net.exit_costs`).
        max_accuracy_drop: the largest accuracy loss allowed as a fraction (0.01 = one
            percentage point below the no-early-exit accuracy), in `[0, 1]`.
        per_exit: choose a threshold per exit instead of one for all (`fit_exit_thresholds`)
            and fold them into the exits' confidence branches (`set_exit_thresholds`), so that
            the net's one threshold then acts as those. It fits the data more closely than one
            T: use enough held-out samples (thousands), and measure on others.
        progress: show a progress bar over the batches.

    Returns:
        The threshold T now set as `net.threshold` (with `per_exit`, the one the exits' own
        thresholds are folded against).

    Raises:
        TypeError: when `net` is not an `EarlyExitNet` or a batch is not an `(x, y)` pair.
        ValueError: when neither or both budgets are given, a budget is out of range, the
            loader is empty or its inputs do not have the shape `net.input_size`. The net's
            threshold is then left as it was.

    Example:
        >>> import timm, torch, earlyexit
        >>> from earlyexit.calibrate import calibrate
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2)
        >>> data = [(torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))]
        >>> t = calibrate(net, data, max_accuracy_drop=0.0, progress=False)
        >>> t == net.threshold
        True
    """
    _check_net(net)
    if (target_cost is None) == (max_accuracy_drop is None):
        raise ValueError(
            "Expected exactly one of `target_cost` and `max_accuracy_drop`, got "
            f"target_cost={target_cost!r}, max_accuracy_drop={max_accuracy_drop!r}."
        )
    costs = net.exit_costs.tolist()
    if target_cost is not None:
        target_cost = _check_real(target_cost, "target_cost")
        if not costs[0] <= target_cost <= costs[-1]:
            raise ValueError(
                f"Expected `target_cost` in [{costs[0]:.4f}, {costs[-1]:.4f}] (the costs of "
                f"exit 0 and of the final exit), got {target_cost!r}. Hint: no threshold costs "
                "less than exit 0; every threshold meets a target of c_N or more, and T > 1 "
                "turns early exits off."
            )
    if max_accuracy_drop is not None:
        max_accuracy_drop = _check_real(max_accuracy_drop, "max_accuracy_drop")
        if not 0 <= max_accuracy_drop <= 1:
            raise ValueError(
                f"Expected `max_accuracy_drop` to be a fraction in [0, 1], got "
                f"{max_accuracy_drop!r}. Hint: 0.01 allows one percentage point less accuracy."
            )
    cache = collect_exit_cache(net, loader, progress=progress, desc="calibrating")
    if per_exit:
        thresholds = fit_exit_thresholds(
            cache, target_cost=target_cost, max_accuracy_drop=max_accuracy_drop
        )
        set_exit_thresholds(net, thresholds)
        return net.threshold
    observed = cache.confidence[cache.confidence >= 0]
    candidates = np.unique(np.concatenate([observed, np.array([0.0, NEVER], np.float32)]))
    accuracy, mean_cost, _ = sweep_thresholds(cache, candidates)
    tol = 1e-9
    if target_cost is not None:
        feasible = mean_cost <= target_cost + tol
        # Highest accuracy, then lowest cost, then the highest threshold.
        keys = (candidates, -mean_cost, accuracy)
    else:
        reference = float(cache.exit_accuracy[-1])
        feasible = accuracy >= reference - max_accuracy_drop - tol
        # Lowest cost, then highest accuracy, then the highest threshold.
        keys = (candidates, accuracy, -mean_cost)
    order = np.lexsort(keys)
    best = next(int(k) for k in order[::-1] if feasible[k])
    threshold = _robust_threshold(candidates, best)
    net.threshold = threshold
    return threshold


def score_exit_thresholds(
    cache: ExitCache, thresholds: Sequence[float]
) -> tuple[float, float, np.ndarray]:
    """Accuracy, mean cost and exit counts with a threshold per early exit.

    Args:
        cache: from `earlyexit.evaluation.collect_exit_cache`.
        thresholds: T_0 ... T_{N-1}; a sample leaves at the first exit i with h_i >= T_i.

    Returns:
        `(accuracy, mean_cost, counts)`, counts of shape `(N+1,)`.
    """
    t = np.asarray(thresholds, np.float32)
    leave = np.concatenate([cache.confidence >= t, np.ones((cache.num_samples, 1), bool)], axis=1)
    exit_of = leave.argmax(axis=1)
    rows = np.arange(cache.num_samples)
    accuracy = float(cache.correct[rows, exit_of].mean()) if cache.num_samples else 0.0
    mean_cost = float(cache.costs[exit_of].mean()) if cache.num_samples else 0.0
    counts = np.bincount(exit_of, minlength=len(cache.costs))
    return accuracy, mean_cost, counts


def fit_exit_thresholds(
    cache: ExitCache,
    *,
    target_cost: float | None = None,
    max_accuracy_drop: float | None = None,
    candidates: int = 64,
    rounds: int = 4,
) -> list[float]:
    """Choose a threshold per early exit that meets a budget on cached data.

    The budget is `calibrate`'s: the highest accuracy at mean cost at most `target_cost`, or
    the lowest mean cost at accuracy at most `max_accuracy_drop` below the final exit's. The
    search starts from the best single threshold and then, exit by exit, moves each T_i to the
    best of `candidates` values (midpoints between quantiles of h_i on the data, and "never")
    while the others stay, for `rounds` rounds or until nothing improves. The result is never
    worse on this data than the best single threshold among the same candidates.

    Args:
        cache: from `earlyexit.evaluation.collect_exit_cache`, on held-out data.
        target_cost: the largest mean relative cost allowed.
        max_accuracy_drop: the largest accuracy loss allowed, as a fraction.
        candidates: how many values each T_i is chosen from.
        rounds: passes over the exits.

    Returns:
        T_0 ... T_{N-1}, each in `[0, 1]` or `NEVER`.

    Raises:
        ValueError: when neither or both budgets are given, or no threshold meets the budget.

    Example:
        >>> import numpy as np
        >>> from earlyexit.evaluation import ExitCache
        >>> from earlyexit.calibrate import fit_exit_thresholds
        >>> conf = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.1]], np.float32)
        >>> right = np.array([[1, 0, 1], [0, 1, 1], [0, 0, 1]], bool)
        >>> cache = ExitCache(conf, right, np.array([0.3, 0.6, 1.0]))
        >>> t = fit_exit_thresholds(cache, max_accuracy_drop=0.0)
        >>> [bool(conf[k, 0] >= t[0]) for k in range(3)]
        [True, False, False]
    """
    if (target_cost is None) == (max_accuracy_drop is None):
        raise ValueError(
            "Expected exactly one of `target_cost` and `max_accuracy_drop`, got "
            f"target_cost={target_cost!r}, max_accuracy_drop={max_accuracy_drop!r}."
        )
    n_exits = cache.confidence.shape[1]
    reference = float(cache.exit_accuracy[-1])
    tol = 1e-9

    def key(t: Sequence[float]) -> tuple[bool, float, float]:
        accuracy, cost, _ = score_exit_thresholds(cache, t)
        if target_cost is not None:
            return cost <= target_cost + tol, accuracy, -cost
        return accuracy >= reference - max_accuracy_drop - tol, -cost, accuracy  # type: ignore[operator]

    values = []
    for i in range(n_exits):
        h = cache.confidence[:, i]
        h = h[np.isfinite(h)]
        q = np.unique(np.quantile(h, np.linspace(0, 1, candidates))) if h.size else np.array([])
        mids = (q[1:] + q[:-1]) / 2 if q.size > 1 else q
        values.append(np.unique(np.concatenate([[0.0], mids, [NEVER]]).astype(np.float32)))
    shared = np.unique(np.concatenate(values))
    best = max(([float(t)] * n_exits for t in shared), key=key)
    best_key = key(best)
    for _ in range(rounds):
        improved = False
        for i in range(n_exits):
            for t in values[i]:
                trial = [*best[:i], float(t), *best[i + 1 :]]
                trial_key = key(trial)
                if trial_key > best_key:
                    best, best_key, improved = trial, trial_key, True
        if not improved:
            break
    if not best_key[0]:
        raise ValueError(
            "No thresholds meet the budget on this data. Hint: allow a higher `target_cost` "
            "or a larger `max_accuracy_drop`."
        )
    return best


def set_exit_thresholds(net: EarlyExitNet, thresholds: Sequence[float]) -> None:
    """Make the net's one threshold act as a threshold per exit, by shifting confidences.

    Exit i's confidence logit a_i is shifted by logit(T) - logit(T_i), where T is
    `net.threshold` (set to 0.5 first when it is 0 or above 1), so that h_i >= T exactly
    where, before, h_i >= T_i: the shift goes into the bias of exit i's confidence branch,
    so it is saved, exported and captured with the net. T_i = 0 makes exit i take every
    sample that reaches it, T_i above 1 none. Changing `net.threshold` later moves every
    exit's threshold with it.

    Args:
        net: the early-exit network.
        thresholds: T_0 ... T_{N-1}, from `fit_exit_thresholds`.

    Raises:
        ValueError: when the number of thresholds is not the number of early exits, or one
            is negative or NaN.

    Example:
        >>> import timm, torch, earlyexit
        >>> from earlyexit.calibrate import set_exit_thresholds
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2).eval()
        >>> x = torch.randn(4, 3, 32, 32)
        >>> set_exit_thresholds(net, [2.0, 0.0])  # never at exit 0, always at exit 1
        >>> net.early_exit(x).exit_index.tolist()
        [1, 1, 1, 1]
    """
    _check_net(net)
    values = [check_threshold(t) for t in thresholds]
    if len(values) != net.num_exits:
        raise ValueError(
            f"Expected {net.num_exits} thresholds, one per early exit, got {len(values)}."
        )
    if not 0 < net.threshold < 1:
        net.threshold = PAPER_THRESHOLD
    base = math.log(net.threshold / (1 - net.threshold))
    big = 1e4  # sigmoid(+-1e4) is exactly 1 or 0 in every float type
    with torch.no_grad():
        for head, t in zip(net.heads, values, strict=True):
            if t <= 0:
                shift = big
            elif t > 1:
                shift = -big
            elif t == 1:
                shift = base - 30.0  # only a_i >= 30, where h_i rounds to 1
            else:
                shift = base - math.log(t / (1 - t))
            head.confidence.bias.add_(shift)


def plot_tradeoff(curve: TradeoffCurve, ax: Any = None, path: str | None = None) -> Any:
    """Plot accuracy against mean cost, one point per threshold, the paper's T = 0.5 marked.

    Needs matplotlib (`pip install earlyexit[plot]`).

    Args:
        curve: from `tradeoff_curve`.
        ax: a matplotlib `Axes` to draw on; a new figure when None.
        path: where to save the figure (any format matplotlib knows), when given.

    Returns:
        The `Axes`.

    Raises:
        ImportError: when matplotlib is not installed.

    Example:
        >>> from earlyexit.calibrate import TradeoffCurve, plot_tradeoff
        >>> curve = TradeoffCurve([0.5, 2.0], [0.8, 0.9], [0.5, 1.0], [[5, 5], [0, 10]],
        ...                       [0.7, 0.9], [0.4, 1.0], 10)
        >>> ax = plot_tradeoff(curve)
        >>> ax.get_xlabel()
        'mean cost (fraction of the original MACs)'
    """
    try:
        import matplotlib

        if ax is None and path is not None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(5, 3.5), layout="constrained").subplots()
        elif ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(5, 3.5), layout="constrained")
    except ImportError as err:
        raise ImportError(
            "plot_tradeoff needs matplotlib. Hint: `pip install earlyexit[plot]`."
        ) from err
    del matplotlib
    points = sorted(zip(curve.mean_cost, curve.accuracy, curve.thresholds, strict=True))
    ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", ms=3, label="threshold T")
    ax.axhline(100 * curve.reference_accuracy, color="gray", ls="--", lw=0.8, label="no early exit")
    for cost, acc, t in points:
        if t == PAPER_THRESHOLD:
            ax.plot([cost], [100 * acc], "r*", ms=12, label="T = 0.5 (paper)")
    ax.set_xlabel("mean cost (fraction of the original MACs)")
    ax.set_ylabel("accuracy (%)")
    ax.legend(loc="lower right", fontsize="small")
    if path is not None:
        ax.figure.savefig(path, dpi=150)
    return ax


def _check_net(net: object) -> None:
    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"Expected `{name}` to be a real number, got {value!r}.")
    return float(value)


def _robust_threshold(candidates: np.ndarray, k: int) -> float:
    """A T that behaves like `candidates[k]` on the data, midway to the next lower candidate."""
    value = float(candidates[k])
    if k == 0 or value > 1:
        return value
    below = float(candidates[k - 1])
    mid = (below + value) / 2
    if below < np.float32(mid) <= value:
        return mid
    return value
