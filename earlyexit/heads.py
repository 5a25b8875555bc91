"""Exit heads: `plain`, `pool` and `bnpool`.

Each head takes one feature tensor and returns `(class_logits, confidence_logit)` of shapes
`(B, num_classes)` and `(B,)`. The feature may be channels-first `(B, C, H, W)`, channels-last
`(B, H, W, C)` or tokens `(B, L, C)`; the channel axis comes from the traced graph.

- `plain`: flatten, then the two linear branches.
- `pool`: global average pool over every axis but batch and channels, then the two branches.
- `bnpool`: BatchNorm (LayerNorm over the channels for channels-last features and tokens),
  ReLU, global average pool, then the two branches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["EXIT_TYPES", "ExitHead", "canonical_exit_type", "create_head"]

EXIT_TYPES = ("plain", "pool", "bnpool")


def canonical_exit_type(exit_type: str) -> str:
    """Check an exit type name.

    Raises:
        ValueError: for an unknown name.
    """
    if not isinstance(exit_type, str) or exit_type.lower() not in EXIT_TYPES:
        raise ValueError(
            f"Unknown exit type {exit_type!r}. Hint: use one of {', '.join(EXIT_TYPES)}."
        )
    return exit_type.lower()


class ExitHead(nn.Module):
    """An early-exit block: a classification branch and a confidence branch on one feature.

    Args:
        exit_type: `plain`, `pool` or `bnpool`.
        shape: the feature's shape for one sample, without the batch axis.
        channel_axis: the axis of the batched feature `(B, *shape)` holding the channels.
        num_classes: outputs of the classification branch.
    """

    def __init__(
        self, exit_type: str, shape: tuple[int, ...], channel_axis: int, num_classes: int
    ) -> None:
        super().__init__()
        self.exit_type = canonical_exit_type(exit_type)
        self.shape = tuple(shape)
        ndim = len(self.shape) + 1
        self.channel_axis = channel_axis % ndim
        channels = self.shape[self.channel_axis - 1]
        self.pool_dims = tuple(d for d in range(1, ndim) if d != self.channel_axis)
        self.norm: nn.Module | None = None
        if self.exit_type == "bnpool":
            if self.channel_axis == 1 and ndim == 4:
                self.norm = nn.BatchNorm2d(channels)
            elif self.channel_axis == 1 and ndim == 3:
                self.norm = nn.BatchNorm1d(channels)
            else:
                self.norm = nn.LayerNorm(channels)
        in_features = math.prod(self.shape) if self.exit_type == "plain" else channels
        self.classifier = nn.Linear(in_features, num_classes)
        self.confidence = nn.Linear(in_features, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.exit_type == "plain":
            z = x.flatten(1)
        else:
            if self.norm is not None:
                if isinstance(self.norm, nn.LayerNorm) and self.channel_axis != x.ndim - 1:
                    x = self.norm(x.movedim(self.channel_axis, -1)).movedim(-1, self.channel_axis)
                else:
                    x = self.norm(x)
                x = torch.relu(x)
            z = x.mean(dim=self.pool_dims)
        return self.classifier(z), self.confidence(z).squeeze(-1)

    def extra_repr(self) -> str:
        return f"{self.exit_type}, shape={self.shape}, channel_axis={self.channel_axis}"


def create_head(
    exit_type: str, shape: tuple[int, ...], channel_axis: int, num_classes: int
) -> ExitHead:
    """Create an exit head for a feature of the given shape and layout."""
    return ExitHead(exit_type, shape, channel_axis, num_classes)
