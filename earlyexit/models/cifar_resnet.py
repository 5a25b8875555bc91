"""The CIFAR ResNets of He et al. 2016 (§4.2, "6n+2" layers), as used in the EENets paper.

A 3×3 stem with 16 channels, three stages of n basic blocks with 16, 32 and 64 channels (the first
block of stages 2 and 3 halves the resolution), global average pooling and one linear layer.
Shortcuts are identities; where the shape changes they subsample and zero-pad the channels
(He et al.'s option A), so they have no parameters. `shortcut="projection"` uses a strided 1×1
conv + BatchNorm there instead (option B), as the EENets reference code does: the EENets paper's
Table 6 MACs (41.41M for ResNet-20, …) are those of option B counted by ptflops, which adds
ReLUs to what fvcore counts.

| model | n | params | MACs at 32×32 (fvcore) |
| --- | --- | --- | --- |
| `resnet20` | 3 | 0.27M | 40.9M |
| `resnet32` | 5 | 0.46M | 69.5M |
| `resnet44` | 7 | 0.66M | 98.0M |
| `resnet56` | 9 | 0.85M | 126.6M |
| `resnet110` | 18 | 1.7M | 255.0M |
| `resnet1202` | 200 | 19.4M | 2.85G |
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs
from torch import nn

from earlyexit.models._base import TimmClassifier, init_weights
from earlyexit.models._builder import build_model, make_cfg, register

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "BasicBlock",
    "CifarResNet",
    "ZeroPadShortcut",
]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut: subsample by `stride`, then append zero channels.

    He et al.'s option A. The input channels come first, unchanged; `out_chs - in_chs` zero
    channels follow.

    Args:
        in_chs: channels of the input.
        out_chs: channels of the output, at least `in_chs`.
        stride: spatial subsampling factor.

    Raises:
        ValueError: `out_chs < in_chs` or `stride < 1`.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        if out_chs < in_chs:
            raise ValueError(
                f"Expected `out_chs` >= `in_chs` for a zero-padding shortcut, "
                f"got in_chs={in_chs}, out_chs={out_chs}."
            )
        if stride < 1:
            raise ValueError(f"Expected `stride` to be a positive int, got {stride!r}.")
        self.stride = stride
        self.pad = out_chs - in_chs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Subsample and pad.

        Args:
            x: features, `(B, in_chs, H, W)`.

        Returns:
            `(B, out_chs, ceil(H / stride), ceil(W / stride))`.
        """
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))

    def extra_repr(self) -> str:
        return f"stride={self.stride}, pad={self.pad}"


class BasicBlock(nn.Module):
    """Two 3×3 conv–BN layers with a ReLU between them, a shortcut, and a ReLU after the sum.

    Args:
        in_chs: channels of the input.
        out_chs: channels of the output.
        stride: stride of the first convolution.
        shortcut: where the shape changes, `"zero_pad"` subsamples and pads with zero channels
            (no parameters), `"projection"` uses a strided 1×1 conv + BatchNorm.

    Attributes:
        downsample: the shortcut where the shape changes, else `None` (identity).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        stride: int = 1,
        shortcut: Literal["zero_pad", "projection"] = "zero_pad",
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = (
                ZeroPadShortcut(in_chs, out_chs, stride)
                if shortcut == "zero_pad"
                else nn.Sequential(
                    nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_chs),
                )
            )
        self.act2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block.

        Args:
            x: features, `(B, in_chs, H, W)`.

        Returns:
            `(B, out_chs, ceil(H / stride), ceil(W / stride))`.
        """
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)

    def zero_init_last(self) -> None:
        """Zero the last BatchNorm's scale, so that the block starts as its shortcut."""
        nn.init.zeros_(self.bn2.weight)


class CifarResNet(TimmClassifier):
    """A 6n+2-layer CIFAR ResNet (He et al. 2016, §4.2).

    Args:
        depth: number of weighted layers, 6n+2 for a positive int n (20, 32, 44, 56, 110, 1202).
        num_classes: size of the output; 0 for a model that returns pooled features.
        in_chans: channels of the input image.
        drop_rate: dropout probability before `fc`.
        global_pool: pooling before `fc` (`"avg"`, `"max"`, `"avgmax"`, `"catavgmax"`, or `""`
            for none).
        widths: channels of stages 1, 2 and 3; the stem has as many as stage 1.
        shortcut: where the shape changes, `"zero_pad"` (He et al.'s option A, no parameters)
            or `"projection"` (option B: strided 1×1 conv + BatchNorm, as in the EENets code).
        zero_init_last: start each block's last BatchNorm at scale 0, so each block starts as
            its shortcut (timm's ResNet default). `False` (the default) starts all BatchNorms
            at scale 1 as in He et al. and the paper: zero-init slows short training runs a
            lot (resnet20 with widths 8-16-32 on 6000 MNIST images, one epoch of Adam:
            29.5 % with it, 87.7 % without; 2.5 points on a 10-class image set after two
            epochs). Without it, though, a fresh *untrained* deep model blows up in eval mode
            (ResNet-110 logits ~1e8, ResNet-1202 NaN) until its BatchNorm statistics are
            trained: pass `zero_init_last=True` to benchmark untrained deep models.

    Raises:
        ValueError: `depth` is not 6n+2, `widths` does not hold three positive ints, or
            `shortcut` is unknown.
    """

    def __init__(
        self,
        depth: int = 20,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        widths: tuple[int, int, int] = (16, 32, 64),
        shortcut: Literal["zero_pad", "projection"] = "zero_pad",
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
            raise ValueError(
                f"Expected `depth` to be 6n+2 for a positive int n (20, 32, 44, 56, 110, ...), "
                f"got {depth!r}."
            )
        widths = tuple(widths)
        if len(widths) != 3 or not all(isinstance(w, int) and w > 0 for w in widths):
            raise ValueError(f"Expected `widths` to be three positive ints, got {widths!r}.")
        if shortcut not in ("zero_pad", "projection"):
            raise ValueError(
                f"Expected `shortcut` to be 'zero_pad' or 'projection', got {shortcut!r}."
            )
        blocks_per_stage = (depth - 2) // 6
        self.depth = depth
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU()
        self.feature_info = [{"num_chs": widths[0], "reduction": 1, "module": "act1"}]

        in_chs, reduction = widths[0], 1
        for index, out_chs in enumerate(widths):
            stride = 1 if index == 0 else 2
            reduction *= stride
            blocks = [BasicBlock(in_chs, out_chs, stride, shortcut)]
            blocks += [BasicBlock(out_chs, out_chs) for _ in range(blocks_per_stage - 1)]
            name = f"layer{index + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.feature_info.append({"num_chs": out_chs, "reduction": reduction, "module": name})
            in_chs = out_chs

        self._init_head(widths[-1], num_classes, global_pool)
        init_weights(self, zero_init_last=zero_init_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and the three stages.

        Args:
            x: images, `(B, in_chans, H, W)`.

        Returns:
            Features, `(B, 64, H / 4, W / 4)` for the default widths.
        """
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        return self.layer3(x)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return make_cfg(
        input_size=(3, 32, 32),
        pool_size=(8, 8),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        paper_ids="arXiv:1512.03385",
        paper_name="Deep Residual Learning for Image Recognition",
        **kwargs,
    )


default_cfgs = generate_default_cfgs(
    {
        "resnet20": _cfg(),
        "resnet32": _cfg(),
        "resnet44": _cfg(),
        "resnet56": _cfg(),
        "resnet110": _cfg(),
        "resnet1202": _cfg(),
    }
)


def _create(variant: str, depth: int, pretrained: bool, **kwargs: Any) -> CifarResNet:
    return build_model(CifarResNet, variant, pretrained, depth=depth, **kwargs)


@register
def resnet20(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-20 for CIFAR (n=3): 0.27M parameters, 41M MACs at 32×32.

    Args:
        pretrained: must be False unless `pretrained_cfg_overlay` points at your own weights; no
            weights are published.
        **kwargs: `num_classes`, `in_chans`, `drop_rate`, `global_pool`, `widths`, `shortcut`,
            `zero_init_last`, or any `timm.create_model` option.

    Returns:
        The model.

    Raises:
        ValueError: `pretrained=True` with no weights to load.

    Example:
        >>> import timm, torch, earlyexit
        >>> model = timm.create_model("resnet20").eval()
        >>> model(torch.zeros(1, 3, 32, 32)).shape
        torch.Size([1, 10])
    """
    return _create("resnet20", 20, pretrained, **kwargs)


@register
def resnet32(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-32 for CIFAR (n=5): 0.46M parameters, 70M MACs at 32×32.

    Args:
        pretrained: must be False unless `pretrained_cfg_overlay` points at your own weights.
        **kwargs: as for `resnet20`.

    Returns:
        The model.

    Raises:
        ValueError: `pretrained=True` with no weights to load.
    """
    return _create("resnet32", 32, pretrained, **kwargs)


@register
def resnet44(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-44 for CIFAR (n=7): 0.66M parameters, 98M MACs at 32×32.

    Args:
        pretrained: must be False unless `pretrained_cfg_overlay` points at your own weights.
        **kwargs: as for `resnet20`.

    Returns:
        The model.

    Raises:
        ValueError: `pretrained=True` with no weights to load.
    """
    return _create("resnet44", 44, pretrained, **kwargs)


@register
def resnet56(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-56 for CIFAR (n=9): 0.85M parameters, 127M MACs at 32×32.

    Args:
        pretrained: must be False unless `pretrained_cfg_overlay` points at your own weights.
        **kwargs: as for `resnet20`.

    Returns:
        The model.

    Raises:
        ValueError: `pretrained=True` with no weights to load.
    """
    return _create("resnet56", 56, pretrained, **kwargs)


@register
def resnet110(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-110 for CIFAR (n=18): 1.7M parameters, 255M MACs at 32×32.

    Args:
        pretrained: must be False unless `pretrained_cfg_overlay` points at your own weights.
        **kwargs: as for `resnet20`.

    Returns:
        The model.

    Raises:
        ValueError: `pretrained=True` with no weights to load.
    """
    return _create("resnet110", 110, pretrained, **kwargs)


@register
def resnet1202(pretrained: bool = False, **kwargs: Any) -> CifarResNet:
    """ResNet-1202 for CIFAR (n=200): 19.4M parameters, 2.9G MACs at 32×32.

    Args:
        pretrained: must be False unless `pretrained_cfg_overlay` points at your own weights.
        **kwargs: as for `resnet20`.

    Returns:
        The model.

    Raises:
        ValueError: `pretrained=True` with no weights to load.
    """
    return _create("resnet1202", 1202, pretrained, **kwargs)
