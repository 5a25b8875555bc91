"""Checks of the EENet loss's settings and inputs, each failure with the message users see.

`earlyexit.loss` owns the versions and the defaults and passes them in, so this module depends
on nothing of the loss.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from earlyexit.outputs import ExitOutputs

__all__ = [
    "check_label_smoothing",
    "check_non_negative",
    "check_outputs",
    "check_real",
    "check_target",
    "check_version",
    "resolve_exit_ce_weight",
    "resolve_exits_options",
]


def check_version(version: object, versions: Sequence[str]) -> None:
    """Check `version` is one of `versions`."""
    if version not in versions:
        valid = ", ".join(repr(v) for v in versions)
        raise ValueError(f"Expected `version` to be one of {valid}, got {version!r}.")


def check_real(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"Expected `{name}` to be {what}, got {type(value).__name__} {value!r}.")
    return float(value)


def check_non_negative(name: str, value: object) -> float:
    value = check_real(name, value, "a non-negative float")
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(
            f"Expected `{name}` to be a non-negative float, got {value!r}. Hint: "
            + ("λ = 1.0 is the paper's value." if name == "lam" else "0 turns the term off.")
        )
    return value


def check_label_smoothing(label_smoothing: object) -> float:
    label_smoothing = check_real("label_smoothing", label_smoothing, "a float in [0, 1)")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(
            f"Expected `label_smoothing` to be a float in [0, 1), got {label_smoothing!r}."
        )
    return label_smoothing


def resolve_exit_ce_weight(
    version: str, exit_ce_weight: object, defaults: Mapping[str, float]
) -> float:
    """Check w, `exit_ce_weight`; when None, `defaults[version]` (0 if the version has none)."""
    if exit_ce_weight is None:
        return defaults.get(version, 0.0)
    weight = check_non_negative("exit_ce_weight", exit_ce_weight)
    if version not in defaults and weight != 0.0:
        raise ValueError(
            f"`exit_ce_weight` is only used by versions 'exits' and 'v2+ce', got "
            f"version={version!r} with exit_ce_weight={weight!r}. Hint: the paper's versions "
            "are exact; use version='v2+ce' to add the per-exit cross-entropy to L_v2."
        )
    return weight


def resolve_exits_options(
    version: str,
    distill: object,
    temperature: object,
    exit_precision: object,
    defaults: tuple[float, float, float],
) -> tuple[float, float, float]:
    """Check `"exits"`' options (α, τ, q), `defaults` where not given; other versions take none."""
    default_distill, default_temperature, default_exit_precision = defaults
    given = {"distill": distill, "temperature": temperature, "exit_precision": exit_precision}
    if version != "exits":
        used = [name for name, value in given.items() if value is not None]
        if used:
            raise ValueError(
                f"`{used[0]}` is only used by version 'exits', got version={version!r}. "
                "Hint: leave it out, or use version='exits'."
            )
        return 0.0, default_temperature, default_exit_precision
    alpha = default_distill if distill is None else check_real("distill", distill, "a float")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(
            f"Expected `distill` (α) to be in [0, 1], got {alpha!r}. Hint: 0 trains the early "
            "exits on the labels only, 1 on the final exit's predictions only."
        )
    tau = (
        default_temperature
        if temperature is None
        else check_real("temperature", temperature, "a positive float")
    )
    if not (math.isfinite(tau) and tau > 0.0):
        raise ValueError(
            f"Expected `temperature` (τ) to be a positive float, got {tau!r}. Hint: 1 keeps "
            "the final exit's probabilities as they are; 3 (the default) softens them."
        )
    q = (
        default_exit_precision
        if exit_precision is None
        else check_real("exit_precision", exit_precision, "a float in (0, 1)")
    )
    if not 0.0 < q < 1.0:
        raise ValueError(
            f"Expected `exit_precision` (q) to be a float in (0, 1), got {q!r}. Hint: 0.95 "
            "lets a sample leave when its exit expects to be right 95 % of the time."
        )
    return alpha, tau, q


def check_outputs(outputs: ExitOutputs) -> tuple[list[Tensor], list[Tensor], Tensor]:
    try:
        logits, confidence_logits, costs = (
            outputs.logits,
            outputs.confidence_logits,
            outputs.costs,
        )
    except AttributeError as err:
        raise TypeError(
            f"Expected `outputs` to be an ExitOutputs, got {type(outputs).__name__}. "
            "Hint: call the net in train mode (`net.train(); net(x)`) or use `net.forward_all(x)`."
        ) from err
    if not isinstance(logits, Sequence) or not all(isinstance(z, Tensor) for z in logits):
        raise TypeError("Expected `outputs.logits` to be a list of tensors.")
    if not isinstance(confidence_logits, Sequence) or not all(
        isinstance(a, Tensor) for a in confidence_logits
    ):
        raise TypeError("Expected `outputs.confidence_logits` to be a list of tensors.")
    if not isinstance(costs, Tensor):
        raise TypeError(f"Expected `outputs.costs` to be a tensor, got {type(costs).__name__}.")
    if len(logits) == 0:
        raise ValueError("Expected `outputs.logits` to hold at least one tensor, got none.")
    n = len(logits) - 1
    if len(confidence_logits) != n:
        raise ValueError(
            f"Expected N = {n} confidence logits for {n + 1} class-logit tensors (N early exits "
            f"and the final exit), got {len(confidence_logits)}. Hint: the final exit has no "
            "confidence branch."
        )
    if costs.shape != (n + 1,):
        raise ValueError(
            f"Expected `outputs.costs` of shape ({n + 1},), one cost per exit, got "
            f"{tuple(costs.shape)}."
        )
    shape = logits[0].shape
    if len(shape) != 2:
        raise ValueError(
            f"Expected class logits of shape (B, num_classes), got {tuple(shape)} at exit 0."
        )
    if shape[0] == 0:
        raise ValueError("Expected a non-empty batch, got batch size 0.")
    for i, z in enumerate(logits):
        if z.shape != shape:
            raise ValueError(
                f"Expected every exit's class logits to have the shape of exit 0's, "
                f"{tuple(shape)}, got {tuple(z.shape)} at exit {i}."
            )
    for i, a in enumerate(confidence_logits):
        if a.shape != shape[:1]:
            raise ValueError(
                f"Expected confidence logits of shape ({shape[0]},), got {tuple(a.shape)} at "
                f"exit {i}. Hint: squeeze the confidence branch's last axis."
            )
    return list(logits), list(confidence_logits), costs


def check_target(target: object, batch: int, num_classes: int, validate: bool) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"Expected `target` to be a tensor, got {type(target).__name__}.")
    if target.is_floating_point():
        if target.shape != (batch, num_classes):
            raise ValueError(
                f"Expected soft targets of shape ({batch}, {num_classes}) to match the logits, "
                f"got {tuple(target.shape)}. Hint: class indices must be an integer tensor."
            )
        return
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            "Expected `target` to be integer class indices or float soft targets, got dtype "
            f"{target.dtype}."
        )
    if target.shape != (batch,):
        raise ValueError(
            f"Expected class indices of shape ({batch},) to match the logits, got "
            f"{tuple(target.shape)}."
        )
    if validate:
        # One host sync for both bounds.
        low, high = torch.stack((target.min(), target.max())).tolist()
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"Expected class indices in [0, {num_classes - 1}], got {bad}. Hint: the "
                f"logits have {num_classes} classes; check `num_classes` of the model."
            )
