"""`EarlyExitConfig`: how to convert a model, validated, and as it is kept in saved files."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Literal

from earlyexit.heads import canonical_exit_type
from earlyexit.inference import check_threshold
from earlyexit.placement import canonical_dist

__all__ = ["DEFAULT_CONV_GRAD_SCALE", "EarlyExitConfig"]


#: The factor on the gradient from a `conv` exit head into the backbone when none is given.
DEFAULT_CONV_GRAD_SCALE: float = 0.1


@dataclass
class EarlyExitConfig:
    """How to convert a model. `convert` fills in the resolved `exit_names` and `input_size`.

    Attributes:
        n_exits: N, the number of early exits (the model's own classifier is exit N).
        dist: the distribution rule: `pareto`, `golden_ratio`, `fine`, `linear` or `quadratic`.
        exit_type: the exit head: `conv` (the library's default) or the paper's `plain`,
            `pool` or `bnpool`.
        threshold: T; at inference a sample leaves at exit i when h_i >= T. Above 1: never.
        input_size: `(C, H, W)`; from the model's timm config when None.
        exit_names: the cut points to put the exits after, each by its name or any alias
            (`layer1.2` or `layer1`: see `earlyexit.profile`); chosen by `dist` when None.
            `convert` resolves them to the cut points' own names.
        grad_scale: in training, the factor on the gradient that flows from each exit head
            back into the backbone (the heads' own parameters get their full gradient).
            Below 1, the early exits pull the shared backbone less, which keeps the final
            exit's accuracy (Li et al.'s "gradient equilibrium" idea); 0 trains the heads on
            a backbone that learns only from the final exit. `None` resolves to the exit
            type's default: 1.0 for the paper's heads (`plain`, `pool`, `bnpool`),
            `DEFAULT_CONV_GRAD_SCALE` for `conv`.
    """

    n_exits: int
    dist: Literal["pareto", "golden_ratio", "fine", "linear", "quadratic"] = "pareto"
    exit_type: Literal["plain", "pool", "bnpool", "conv"] = "conv"
    threshold: float = 0.5
    input_size: tuple[int, int, int] | None = None
    exit_names: list[str] | None = None
    grad_scale: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.n_exits, bool) or not isinstance(self.n_exits, int):
            raise ValueError(f"Expected `n_exits` to be a positive int, got {self.n_exits!r}.")
        if self.n_exits < 1:
            raise ValueError(f"Expected `n_exits` to be a positive int, got {self.n_exits!r}.")
        self.dist = canonical_dist(self.dist)  # type: ignore[assignment]
        self.exit_type = canonical_exit_type(self.exit_type)  # type: ignore[assignment]
        self.threshold = check_threshold(self.threshold)
        if self.grad_scale is None:
            self.grad_scale = DEFAULT_CONV_GRAD_SCALE if self.exit_type == "conv" else 1.0
        if isinstance(self.grad_scale, bool) or not isinstance(self.grad_scale, (int, float)):
            raise TypeError(
                f"Expected `grad_scale` to be a float in [0, 1], got {self.grad_scale!r}."
            )
        self.grad_scale = float(self.grad_scale)
        if not 0.0 <= self.grad_scale <= 1.0:
            raise ValueError(
                f"Expected `grad_scale` to be a float in [0, 1], got {self.grad_scale!r}. "
                "Hint: 1 is the paper's joint training; smaller values shield the backbone."
            )
        if self.input_size is not None:
            self.input_size = tuple(self.input_size)  # type: ignore[assignment]
        if self.exit_names is not None:
            names = [] if isinstance(self.exit_names, str) else list(self.exit_names)
            if len(names) != self.n_exits or not all(isinstance(n, str) for n in names):
                raise ValueError(
                    f"Expected `exit_names` to be {self.n_exits} node names, got "
                    f"{self.exit_names!r}."
                )
            self.exit_names = names

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        d = dataclasses.asdict(self)
        if d["input_size"] is not None:
            d["input_size"] = list(d["input_size"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EarlyExitConfig:
        """Rebuild a config from `to_dict`'s output (unknown keys are an error)."""
        return cls(**d)

    def to_json(self) -> str:
        """The config as a JSON string."""
        return json.dumps(self.to_dict())
