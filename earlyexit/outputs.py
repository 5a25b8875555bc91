"""What an early-exit network returns: all exits at once, or one exit per sample."""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["EarlyExitResult", "ExitOutputs"]


class ExitOutputs(NamedTuple):
    """Every exit's outputs for a batch, as a train-mode forward or `forward_all` returns them.

    Attributes:
        logits: N+1 class-logit tensors of shape `(B, num_classes)`, one per exit; the last one
            is the original model's own classifier (the final exit).
        confidence_logits: N tensors of shape `(B,)`, the confidence logits a_i of the early
            exits; the confidence is h_i = sigmoid(a_i).
        costs: 1-D tensor of the N+1 relative costs c_0 < ... < c_N.
    """

    logits: list[torch.Tensor]
    confidence_logits: list[torch.Tensor]
    costs: torch.Tensor


class EarlyExitResult(NamedTuple):
    """The outcome of early-exit inference for a batch.

    Attributes:
        logits: `(B, num_classes)` class logits, each sample's from the exit it left at.
        exit_index: `(B,)` long tensor in `[0, N]`; N means the final exit.
        cost: `(B,)` float tensor, `exit_costs[exit_index]`.
    """

    logits: torch.Tensor
    exit_index: torch.Tensor
    cost: torch.Tensor
