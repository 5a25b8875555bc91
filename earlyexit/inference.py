"""Batched early-exit inference with compaction.

Stage 0 runs on the whole batch. After each early exit, the samples whose confidence reaches the
threshold are finished: their logits, exit index and cost are written into the output by index,
and only the rest continue, compacted, to the next stage. There is no per-sample Python loop and
one host synchronisation per exit (to learn how many samples stay).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn

from earlyexit.outputs import EarlyExitResult

__all__ = [
    "ExitSplit",
    "check_inputs",
    "check_threshold",
    "exit_mask",
    "record_exit",
    "run_early_exit",
    "run_exit",
]


def check_threshold(threshold: object) -> float:
    """Validate a confidence threshold T.

    A sample leaves at exit i when h_i ≥ T; T = 0 makes every sample leave at exit 0 and any
    T above 1 means "never leave early".

    Raises:
        TypeError: when `threshold` is not a real number.
        ValueError: when it is NaN or negative.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise TypeError(f"Expected `threshold` to be a float, got {type(threshold).__name__}.")
    threshold = float(threshold)
    if threshold != threshold or threshold < 0:
        raise ValueError(
            f"Expected `threshold` to be a float >= 0, got {threshold!r}. Hint: 0.5 is the "
            "paper's value; values above 1 mean that no sample leaves early."
        )
    return threshold


def check_inputs(
    x: object, input_size: tuple[int, ...], parameter: torch.Tensor | None, name: str = "x"
) -> None:
    """Check an input batch against the net before any stage runs on it.

    Args:
        x: the batch.
        input_size: the net's `(C, H, W)`, or `()` when unknown (then only the type is checked).
        parameter: one of the net's parameters (its device and dtype), or None.
        name: what the error messages call `x`.

    Raises:
        TypeError: `x` is not a floating-point tensor, or not of the parameters' dtype
            (outside autocast).
        ValueError: `x` does not have one sample per row of `input_size`'s rank, or has
            another number of channels, or lies on another device than the net.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"Expected `{name}` to be a tensor, got {type(x).__name__}. Hint: stack the "
            "inputs into one batch with `torch.stack`."
        )
    if not x.is_floating_point():
        raise TypeError(
            f"Expected `{name}` to hold floating-point inputs, got {x.dtype}. Hint: convert "
            "and normalize them as for the original model (e.g. `x.float() / 255`)."
        )
    if input_size:
        shape = f"(B, {', '.join(map(str, input_size))})"
        if x.ndim == len(input_size):
            raise ValueError(
                f"Expected `{name}` to be a batch of shape {shape}, got {tuple(x.shape)}. "
                f"Hint: a single input needs a batch dimension: `{name}.unsqueeze(0)`."
            )
        if x.ndim != len(input_size) + 1 or x.shape[1] != input_size[0]:
            raise ValueError(
                f"Expected `{name}` to have shape {shape} (`net.input_size`; other sizes "
                f"only where the model allows them), got {tuple(x.shape)}."
            )
    if parameter is None:
        return
    if x.device != parameter.device:
        raise ValueError(
            f"Expected `{name}` on the net's device, {parameter.device}, got {x.device}. "
            f"Hint: `{name}.to({str(parameter.device)!r})`."
        )
    if x.dtype != parameter.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"Expected `{name}` in the net's dtype, {parameter.dtype}, got {x.dtype}. Hint: "
            f"`{name}.to({parameter.dtype})`, or run under `torch.autocast`."
        )


def exit_mask(confidence_logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which samples leave at an exit: `sigmoid(a) >= threshold`, computed in float32."""
    return torch.sigmoid(confidence_logits.float()) >= threshold


def _select(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows `index` of `x`, in one copy that keeps a channels-last layout."""
    if x.ndim == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        # (B, H, W, C) is contiguous: select there, and the result is channels-last again.
        return x.permute(0, 2, 3, 1).index_select(0, index).permute(0, 3, 1, 2)
    return x.index_select(0, index)


class ExitSplit(NamedTuple):
    """One exit's verdict on a batch: who leaves, with which logits, and who goes on.

    Attributes:
        leave: the ids of the samples that leave at this exit.
        logits: their class logits; `(0, num_classes)` when nobody leaves.
        stay: the ids of the samples that go on.
        features: their features, compacted: the next stage's input.
    """

    leave: torch.Tensor
    logits: torch.Tensor
    stay: torch.Tensor
    features: torch.Tensor


def run_exit(
    stage: nn.Module, head: nn.Module, x: torch.Tensor, ids: torch.Tensor, threshold: float
) -> ExitSplit:
    """Run one stage and its exit head on `x`, and split the batch at the exit.

    Args:
        stage: stage i.
        head: exit head i.
        x: the stage's input, one row per entry of `ids`.
        ids: `(B,)` long tensor on `x`'s device, the caller's name for each row.
        threshold: T; a sample leaves when sigmoid(a_i) >= T.

    Returns:
        An `ExitSplit`. Leavers and stayers each keep their order in `x`.
    """
    x = stage(x)
    class_logits, confidence = head(x)
    leave = exit_mask(confidence, threshold)
    n_leave = int(leave.sum())  # the one host synchronisation of this exit
    n_stay = ids.numel() - n_leave
    if n_leave == 0:
        return ExitSplit(ids[:0], class_logits[:0], ids, x)
    if n_stay == 0:  # all leave (always so for a single sample): nothing to sort
        return ExitSplit(ids, class_logits, ids[:0], x[:0])
    order = torch.argsort(leave.to(torch.int8), stable=True)
    go, stay = order[n_stay:], order[:n_stay]
    return ExitSplit(
        ids.index_select(0, go),
        class_logits.index_select(0, go),
        ids.index_select(0, stay),
        _select(x, stay),
    )


def record_exit(
    logits: torch.Tensor | None,
    exit_index: torch.Tensor,
    leave: torch.Tensor,
    leave_logits: torch.Tensor,
    i: int,
) -> torch.Tensor:
    """Write the samples that leave at exit i into the batch's output.

    Args:
        logits: the output logits `(B, K)`, or None before the first exit (then made here,
            in the dtype of `leave_logits`).
        exit_index: `(B,)`, updated in place.
        leave: the ids of the samples that leave.
        leave_logits: their class logits.
        i: the exit.

    Returns:
        The output logits.
    """
    if logits is None:
        logits = leave_logits.new_empty((exit_index.shape[0], leave_logits.shape[1]))
    if leave.numel():
        logits.index_copy_(0, leave, leave_logits.to(logits.dtype))
        exit_index.index_fill_(0, leave, i)
    return logits


def run_early_exit(
    stages: Sequence[nn.Module],
    heads: Sequence[nn.Module],
    x: torch.Tensor,
    threshold: float,
    costs: torch.Tensor,
    num_classes: int,
) -> EarlyExitResult:
    """Run the stages and heads, letting each sample stop at its first confident exit.

    Args:
        stages: N+1 stages; stage N ends with the model's own classifier.
        heads: N exit heads, head i on stage i's output.
        x: the input batch.
        threshold: T; a sample leaves at exit i when sigmoid(a_i) >= T.
        costs: the N+1 relative costs.
        num_classes: the number of classes (shapes the output of an empty batch).

    Returns:
        Per sample: the logits of the exit it left at, that exit's index and its cost.
    """
    n_exits = len(heads)
    batch = x.shape[0]
    device = x.device
    exit_index = torch.full((batch,), n_exits, dtype=torch.long, device=device)
    remaining = torch.arange(batch, device=device)
    logits: torch.Tensor | None = None
    for i in range(n_exits):
        if remaining.numel() == 0:
            break
        split = run_exit(stages[i], heads[i], x, remaining, threshold)
        logits = record_exit(logits, exit_index, split.leave, split.logits, i)
        x, remaining = split.features, split.stay
    if logits is None:  # an empty batch
        logits = x.new_empty((0, num_classes))
    if remaining.numel():
        logits.index_copy_(0, remaining, stages[n_exits](x).to(logits.dtype))
    return EarlyExitResult(logits, exit_index, costs.to(device)[exit_index])
