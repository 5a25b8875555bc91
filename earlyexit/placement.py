"""The five distribution rules of the paper and the rule that places exits on candidates.

Each rule gives N target cost fractions, strictly increasing in (0, 1) (exit i = 0..N-1):

| rule           | target of exit i     |
| -------------- | -------------------- |
| `pareto`       | 1 − 0.8^(i+1)        |
| `fine`         | 1 − 0.95^(i+1)       |
| `golden_ratio` | φ^(i−N), φ = 1.618…  |
| `linear`       | (i+1)/(N+1)          |
| `quadratic`    | ((i+1)/(N+1))²       |

Exit i goes at the first candidate not yet used, after exit i−1's, whose cumulative cost
fraction is at least its target (`place_exits`).

`convert` places exits with `fit_exits`, which applies that rule but never wastes an exit:

- **A useful exit is cheaper than the model.** A sample that leaves at exit i costs
  c_i = f + h_0 + … + h_i: the backbone up to the exit's candidate (its cumulative fraction f)
  plus every exit head it passed through (h_j, a head's MACs as a fraction of the model's). An
  exit is placed only where c_i < 1, so leaving there always costs less than the original model.
  For the first exit this drops every candidate whose remaining work, 1 − f, is no more than its
  own head's cost (a head after the last block, on the pooled features, saves nothing); the
  later an exit, the more earlier heads it carries, so the bound tightens with i.
- **Squeezing.** Exits are placed in order. Each takes the rule's pick unless that would break
  the bound, or leave too few cheap candidates for the exits after it (or the targets run past
  the last candidate); then it takes the latest candidate before the rule's pick that keeps it
  and the rest useful. The exits placed elsewhere than the rule's pick are reported (`convert`
  warns). Fewer useful candidates than exits, or heads so costly that the exits cannot all
  stay cheaper than the model, is an error.
- **Crowding.** One block is the median backbone work between consecutive candidates (the
  typical residual block, transformer block or stage unit of the model). Two consecutive exits
  with less than half a block between them see nearly the same features; they are reported
  (`convert` warns) but kept, since the rule asked for them.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from earlyexit.errors import PlacementError

__all__ = [
    "DISTRIBUTIONS",
    "ExitPlan",
    "canonical_dist",
    "distribution_targets",
    "fit_exits",
    "place_exits",
    "useful_candidates",
]

DISTRIBUTIONS = ("pareto", "golden_ratio", "fine", "linear", "quadratic")
_ALIASES = {"gold_ratio": "golden_ratio", "golden": "golden_ratio"}
_PHI = (1 + math.sqrt(5)) / 2


def canonical_dist(dist: str) -> str:
    """The canonical name of a distribution rule (resolves aliases).

    Raises:
        ValueError: for an unknown name.
    """
    if not isinstance(dist, str):
        raise TypeError(f"Expected `dist` to be a str, got {type(dist).__name__}.")
    name = _ALIASES.get(dist.lower(), dist.lower())
    if name not in DISTRIBUTIONS:
        raise ValueError(
            f"Unknown distribution rule {dist!r}. Hint: use one of {', '.join(DISTRIBUTIONS)} "
            f"(aliases: {', '.join(_ALIASES)})."
        )
    return name


def _check_n_exits(n_exits: object) -> int:
    if isinstance(n_exits, bool) or not isinstance(n_exits, int) or n_exits < 1:
        raise ValueError(f"Expected `n_exits` to be a positive int, got {n_exits!r}.")
    return n_exits


def distribution_targets(dist: str, n_exits: int) -> list[float]:
    """The target cost fractions of a distribution rule.

    Args:
        dist: `pareto`, `golden_ratio` (aliases `gold_ratio`, `golden`), `fine`, `linear` or
            `quadratic`.
        n_exits: N, the number of early exits.

    Returns:
        N fractions, strictly increasing, each in (0, 1).

    Example:
        >>> import earlyexit
        >>> [round(t, 3) for t in earlyexit.distribution_targets("pareto", 3)]
        [0.2, 0.36, 0.488]
    """
    name = canonical_dist(dist)
    n = _check_n_exits(n_exits)
    rule = {
        "pareto": lambda i: 1 - 0.8 ** (i + 1),
        "fine": lambda i: 1 - 0.95 ** (i + 1),
        "golden_ratio": lambda i: _PHI ** (i - n),
        "linear": lambda i: (i + 1) / (n + 1),
        "quadratic": lambda i: ((i + 1) / (n + 1)) ** 2,
    }[name]
    return [rule(i) for i in range(n)]


def place_exits(fractions: Sequence[float], targets: Sequence[float]) -> list[int]:
    """Pick a candidate for each target: the first unused one whose fraction reaches it.

    Args:
        fractions: cumulative cost fraction of each candidate, non-decreasing.
        targets: target fractions, increasing.

    Returns:
        Indices into `fractions`, strictly increasing.

    Raises:
        PlacementError: when the candidates run out before the targets do.
    """
    chosen: list[int] = []
    start = 0
    for i, target in enumerate(targets):
        pick = next((k for k in range(start, len(fractions)) if fractions[k] >= target), None)
        if pick is None:
            taken = (
                f"exits 0..{i - 1} took the ones up to index {start - 1}"
                if i
                else "none of them reaches it"
            )
            raise PlacementError(
                f"Exit {i} (target cost fraction {target:.3f}) has no candidate left: the model "
                f"has {len(fractions)} candidate exit points and {taken}. Hint: "
                "`earlyexit.profile(model)` lists them; use fewer exits or another `dist`. "
                "A model with few or only early candidates keeps values computed early alive "
                "until its head (parallel streams, or a head that fuses several stages)."
            )
        chosen.append(pick)
        start = pick + 1
    return chosen


@dataclass(frozen=True)
class ExitPlan:
    """Where `fit_exits` put the exits, and what it had to give up.

    Attributes:
        picks: per exit, the index of its candidate, strictly increasing.
        squeezed: the exits placed earlier than the rule's pick (or where the rule had none
            left), to keep every exit cheaper than the model.
        crowded: the exits i > 0 with less than half a block of backbone work since exit i−1.
        dropped: the candidates where not even a first exit would cost less than the model.
        block: one block: the median cost fraction between consecutive useful candidates.
    """

    picks: list[int]
    squeezed: list[int] = field(default_factory=list)
    crowded: list[int] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)
    block: float = 0.0


def useful_candidates(fractions: Sequence[float], head_fractions: Sequence[float]) -> list[int]:
    """The candidates where an exit can save more than its head costs: 1 − f > h.

    Args:
        fractions: cumulative cost fraction of each candidate, non-decreasing.
        head_fractions: per candidate, the MACs of an exit head there as a fraction of the model.

    Returns:
        Their indices, increasing.
    """
    if len(fractions) != len(head_fractions):
        raise ValueError(
            f"Expected one head fraction per candidate, got {len(head_fractions)} for "
            f"{len(fractions)} candidates."
        )
    return [k for k, (f, h) in enumerate(zip(fractions, head_fractions)) if 1.0 - f > h]


def fit_exits(
    fractions: Sequence[float], head_fractions: Sequence[float], targets: Sequence[float]
) -> ExitPlan:
    """Place exits by their targets, each at a candidate where it costs less than the model.

    The rule of `place_exits` on the useful candidates, then squeezed where it must be: see the
    module's docstring.

    Args:
        fractions: cumulative cost fraction of each candidate, non-decreasing.
        head_fractions: per candidate, the MACs of an exit head there as a fraction of the model.
        targets: target fractions, increasing, one per exit.

    Returns:
        The `ExitPlan`.

    Raises:
        PlacementError: when there are fewer useful candidates than targets, or the heads cost
            so much that the exits cannot all be cheaper than the model.

    Example:
        >>> from earlyexit.placement import fit_exits
        >>> plan = fit_exits([0.3, 0.6, 0.999], [0.01, 0.01, 0.01], [0.5, 0.9])
        >>> plan.picks, plan.squeezed, plan.dropped
        ([0, 1], [0, 1], [2])
    """
    useful = useful_candidates(fractions, head_fractions)
    dropped = sorted(set(range(len(fractions))) - set(useful))
    n = len(targets)
    if len(useful) < n:
        raise PlacementError(
            f"The model has {len(fractions)} candidate exit points but only {len(useful)} where "
            f"an exit costs less than the model itself, for {n} exits. Hint: "
            "`earlyexit.profile(model)` lists them; use fewer exits."
        )
    f = [fractions[k] for k in useful]
    h = [head_fractions[k] for k in useful]
    m = len(useful)

    def cheap(k: int, spent: float) -> bool:
        return f[k] + spent + h[k] < 1.0

    def room_after(k: int, spent: float, count: int) -> bool:
        # The later exits, each at the earliest cheap candidate after the one before it.
        for _ in range(count):
            k = next((j for j in range(k + 1, m) if cheap(j, spent)), m)
            if k == m:
                return False
            spent += h[k]
        return True

    # The rule's own picks among the useful candidates; m (past the end) where it has none left.
    rule: list[int] = []
    for target in targets:
        start = rule[-1] + 1 if rule else 0
        rule.append(next((k for k in range(min(start, m), m) if f[k] >= target), m))
    picks: list[int] = []
    spent = 0.0
    for i, target in enumerate(targets):
        first = picks[-1] + 1 if picks else 0
        want = next((k for k in range(first, m) if f[k] >= target), m - 1)
        # The latest candidate up to the rule's pick that is cheap and leaves room for the rest.
        k = want
        while k >= first and not (cheap(k, spent) and room_after(k, spent + h[k], n - 1 - i)):
            k -= 1
        if k < first:
            raise PlacementError(
                f"{n} exits cannot all cost less than the model: their heads cost too much for "
                f"the candidates {'left after exit ' + str(i - 1) if i else 'there are'}. Hint: "
                "use fewer exits, or a cheaper "
                "`exit_type` (`pool`)."
            )
        picks.append(k)
        spent += h[k]
    squeezed = [i for i in range(n) if picks[i] != rule[i]]
    gaps = [b - a for a, b in zip(f, f[1:])]
    block = statistics.median(gaps) if gaps else 0.0
    crowded = [i for i in range(1, n) if f[picks[i]] - f[picks[i - 1]] < block / 2]
    return ExitPlan([useful[k] for k in picks], squeezed, crowded, dropped, block)
