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
fraction is at least its target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from earlyexit.errors import PlacementError

__all__ = ["DISTRIBUTIONS", "canonical_dist", "distribution_targets", "place_exits"]

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
