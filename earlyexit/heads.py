"""Exit heads: `plain`, `pool`, `bnpool` (the paper's) and `conv` (the library's default).

Each head takes one feature tensor and returns `(class_logits, confidence_logit)` of shapes
`(B, num_classes)` and `(B,)`. The feature may be channels-first `(B, C, H, W)`, channels-last
`(B, H, W, C)` or tokens `(B, L, C)`; the channel axis comes from the traced graph.

- `plain`: flatten, then the two linear branches.
- `pool`: global average pool over every axis but batch and channels, then the two branches.
- `bnpool`: BatchNorm (LayerNorm over the channels for channels-last features and tokens),
  ReLU, global average pool, then the two branches.
- `conv`: average pool to a grid of at most 4×4 (`pool_window`), one 3×3 convolution to
  `conv_width(C)` channels, BatchNorm and ReLU, average pool to a layout of at most 2×2 cells
  (`LAYOUT_GRID`), flattened into the two branches (for channels-last features and tokens:
  LayerNorm, a linear layer to that width and GELU, then a global average pool), in the
  manner of MSDNet's and SDN's exits. The confidence branch also sees how sure the exit's
  own classifier is: the log-probability of its top class, the margin between its two top
  logits and the logit of its top probability (detached, so training the confidence never
  changes the classifier). It starts as max-softmax: before any training, h ≥ 0.5 exactly
  where the top probability is at least `CONFIDENCE_PRIOR` (the default exit precision q of
  `EENetLoss`); training then learns where that is wrong. A linear probe on
  the backbone's features is too weak an exit early in the network; one more layer lets the exit
  compute features of its own, and pooling first keeps that layer cheap (its MACs are counted in
  the exit's cost). Early in the network each feature sees only a small part of the image, so
  *where* it fires carries much of the class; a global average would throw that away, while a
  2×2 layout keeps it (on a map that is already 2×2 or smaller, nothing is pooled away).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from earlyexit.loss import DEFAULT_EXIT_PRECISION

__all__ = ["EXIT_TYPES", "ExitHead", "canonical_exit_type", "create_head"]

EXIT_TYPES = ("plain", "pool", "bnpool", "conv")

#: The narrowest hidden width of a `conv` head.
CONV_MIN_WIDTH = 32
#: A `conv` head pools its input to a grid of at most this many positions per axis.
POOL_GRID = 4
#: A `conv` head keeps a layout of at most this many cells per axis after its convolution.
LAYOUT_GRID = 2
#: A `conv` head's confidence starts as "the top probability is at least this" (h = 0.5 there):
#: `EENetLoss`'s default exit precision q, so that an untrained confidence is max-softmax read
#: at the precision the loss trains it for.
CONFIDENCE_PRIOR = DEFAULT_EXIT_PRECISION
#: How far the logit of the top probability is trusted (it is ±inf for a single class).
_MAX_LOGIT = 30.0


def conv_width(channels: int) -> int:
    """The hidden width of a `conv` head on a feature with `channels` channels.

    A quarter of the channels, but at least `CONV_MIN_WIDTH`: a thin early feature (4-16
    channels in the small ResNets) is widened, since a classifier on a handful of features is
    too weak an exit, and a wide one stays cheap (256 channels in ResNet-50's `layer1` give 64).
    The convolution runs on a map pooled to at most 4×4, so the extra width costs little: on
    resnet20's 16-channel first stage, 74 thousand MACs, 0.18 % of the model.
    """
    return max(CONV_MIN_WIDTH, channels // 4)


def pool_window(size: int, grid: int = POOL_GRID) -> int:
    """The window of a `conv` head's average pool along an axis of `size` positions.

    The smallest window that divides `size` and leaves at most `grid` positions; with the
    default 4: 32 → 8 (a 4×4 grid), 28 → 7, 14 → 7 (2×2), 7 → 7 (1×1). Windows that tile the
    map exactly average the same way in PyTorch and in exported ONNX graphs, where partial
    windows do not.
    """
    return next(k for k in range(1, size + 1) if size % k == 0 and size // k <= grid)


def certainty(class_logits: torch.Tensor) -> torch.Tensor:
    """`(B, 3)`: the top class's log-probability log p, the margin between the two top logits,
    and logit p = log p − log(1 − p), clamped to ±30.

    Computed on detached logits, in float32: inputs of a `conv` head's confidence branch. With
    r = Σ over the other classes of exp(z_j − z_top), p = 1 / (1 + r), so log p = −log1p(r)
    and logit p = −log r, both exact near p = 1 (r is summed from the other classes' own terms).
    """
    z = class_logits.detach().float()
    top, index = z.topk(min(2, z.shape[1]), dim=1)
    rest = (z - top[:, :1]).exp().scatter(1, index[:, :1], 0.0).sum(dim=1)
    log_p = -torch.log1p(rest)
    margin = top[:, 0] - top[:, -1]
    logit_p = (-rest.log()).clamp(-_MAX_LOGIT, _MAX_LOGIT)
    return torch.stack((log_p, margin, logit_p), dim=1).to(class_logits.dtype)


def _init_confidence_prior(confidence: nn.Linear) -> None:
    """a = logit p − logit `CONFIDENCE_PRIOR`: the last input is `certainty`'s logit p."""
    with torch.no_grad():
        confidence.weight.zero_()
        confidence.weight[0, -1] = 1.0
        confidence.bias.fill_(-math.log(CONFIDENCE_PRIOR / (1.0 - CONFIDENCE_PRIOR)))


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
        exit_type: `plain`, `pool`, `bnpool` or `conv`.
        shape: the feature's shape for one sample, without the batch axis.
        channel_axis: the axis of the batched feature `(B, *shape)` holding the channels.
        num_classes: outputs of the classification branch.
        layout: a channels-first `conv` head keeps at most `layout`×`layout` cells after its
            convolution (`LAYOUT_GRID`); 1 averages them into one, as the library's earlier
            `conv` heads did (files saved without a layout load with 1). Other heads ignore
            it.

    Raises:
        ValueError: for an unknown exit type or a `layout` that is not a positive integer.
    """

    def __init__(
        self,
        exit_type: str,
        shape: tuple[int, ...],
        channel_axis: int,
        num_classes: int,
        *,
        layout: int = LAYOUT_GRID,
    ) -> None:
        super().__init__()
        if isinstance(layout, bool) or not isinstance(layout, int) or layout < 1:
            raise ValueError(
                f"Expected `layout` to be a positive int, got {layout!r}. Hint: "
                f"{LAYOUT_GRID} (the default) keeps a {LAYOUT_GRID}×{LAYOUT_GRID} layout; "
                "1 averages the head's map into one cell."
            )
        self.exit_type = canonical_exit_type(exit_type)
        self.layout = layout
        self.cells = 1
        self.shape = tuple(shape)
        ndim = len(self.shape) + 1
        self.channel_axis = channel_axis % ndim
        channels = self.shape[self.channel_axis - 1]
        self.pool_dims = tuple(d for d in range(1, ndim) if d != self.channel_axis)
        self.norm: nn.Module | None = None
        self.conv: nn.Module | None = None
        # A channels-first `conv` head's layout cell: what `earlyexit._head_folding` folds.
        self._fold_cell: tuple[int, int] | None = None
        in_features = math.prod(self.shape) if self.exit_type == "plain" else channels
        extra = 0
        if self.exit_type == "conv":
            in_features = conv_width(channels)
            extra = 3  # the classifier's certainty
            if self.channel_axis == 1 and ndim == 4:
                kernel = tuple(pool_window(n) for n in self.shape[1:])
                grid = [n // k for n, k in zip(self.shape[1:], kernel)]
                cell = tuple(pool_window(n, grid=layout) for n in grid)
                self.cells = math.prod(n // k for n, k in zip(grid, cell))
                self.conv = nn.Sequential(
                    nn.AvgPool2d(kernel, kernel),
                    nn.Conv2d(channels, in_features, 3, padding=1, bias=False),
                    nn.BatchNorm2d(in_features),
                    nn.ReLU(inplace=True),
                )
                if self.cells > 1 and cell != (1, 1):
                    self.conv.append(nn.AvgPool2d(cell, cell))
                in_features *= self.cells
                self._fold_cell = cell
            else:
                self.conv = nn.Sequential(
                    nn.LayerNorm(channels), nn.Linear(channels, in_features), nn.GELU()
                )
        elif self.exit_type == "bnpool":
            if self.channel_axis == 1 and ndim == 4:
                self.norm = nn.BatchNorm2d(channels)
            elif self.channel_axis == 1 and ndim == 3:
                self.norm = nn.BatchNorm1d(channels)
            else:
                self.norm = nn.LayerNorm(channels)
        self.classifier = nn.Linear(in_features, num_classes)
        self.confidence = nn.Linear(in_features + extra, 1)
        if extra:
            _init_confidence_prior(self.confidence)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.exit_type == "plain":
            z = x.flatten(1)
        elif self.conv is not None:
            if isinstance(self.conv[0], nn.AvgPool2d):
                z = self.conv(x)
                z = z.flatten(1) if self.cells > 1 else z.mean(dim=(2, 3))
            else:
                x = self.conv(x.movedim(self.channel_axis, -1))
                z = x.mean(dim=tuple(range(1, x.ndim - 1)))
            logits = self.classifier(z)
            return logits, self.confidence(torch.cat((z, certainty(logits)), dim=1)).squeeze(-1)
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
        text = f"{self.exit_type}, shape={self.shape}, channel_axis={self.channel_axis}"
        return text + (f", cells={self.cells}" if self.cells > 1 else "")


def create_head(
    exit_type: str,
    shape: tuple[int, ...],
    channel_axis: int,
    num_classes: int,
    *,
    layout: int = LAYOUT_GRID,
) -> ExitHead:
    """Create an exit head for a feature of the given shape and layout (see `ExitHead`)."""
    return ExitHead(exit_type, shape, channel_axis, num_classes, layout=layout)
