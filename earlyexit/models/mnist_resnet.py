"""The EENets paper's small 8-layer ResNet for MNIST (§4.1, Tables 2 and 3).

A 3×3 stem convolution with `width` channels, three pre-activation residual blocks with `width`,
2·`width` and 4·`width` channels (the first keeps the resolution, the other two halve it and
project their shortcut with a strided 1×1 convolution and BatchNorm), then BatchNorm, ReLU, global
average pooling and one linear layer: 1 + 3·2 + 1 = 8 weighted layers. The paper trains it with
`width` 4 ("EENet-8 starting with 4 filters") and 2.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models import generate_default_cfgs
from torch import nn

from earlyexit.models._base import TimmClassifier, init_weights
from earlyexit.models._builder import build_model, make_cfg, register

__all__ = ["MNIST_MEAN", "MNIST_STD", "MnistResNet", "PreActBlock"]

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)


class PreActBlock(nn.Module):
    """BN–ReLU–3×3 conv, twice, plus a shortcut (He et al. 2016, "Identity Mappings").

    Args:
        in_chs: channels of the input.
        out_chs: channels of the output.
        stride: stride of the first convolution.

    Attributes:
        downsample: strided 1×1 conv + BatchNorm on the block's input where the shape changes,
            else `None` (identity).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, padding=1, bias=False)
        self.downsample = (
            nn.Sequential(
                nn.Conv2d(in_chs, out_chs, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_chs),
            )
            if stride != 1 or in_chs != out_chs
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the block.

        Args:
            x: features, `(B, in_chs, H, W)`.

        Returns:
            `(B, out_chs, ceil(H / stride), ceil(W / stride))`, not activated: the next block (or
            the final `norm`/`act`) does that.
        """
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.conv1(self.act1(self.bn1(x)))
        x = self.conv2(self.act2(self.bn2(x)))
        return x + shortcut

    def zero_init_last(self) -> None:
        """Zero the last convolution, so that the block starts as its shortcut."""
        nn.init.zeros_(self.conv2.weight)


class MnistResNet(TimmClassifier):
    """The paper's 8-layer pre-activation ResNet for MNIST.

    Args:
        width: channels of the stem and the first block; the others have 2× and 4× as many.
        num_classes: size of the output; 0 for a model that returns pooled features.
        in_chans: channels of the input image.
        drop_rate: dropout probability before `fc`.
        global_pool: pooling before `fc` (`"avg"`, `"max"`, `"avgmax"`, `"catavgmax"`, or `""`
            for none).
        zero_init_last: start each block's last convolution at zero, so each block starts as
            its shortcut (off by default, as in timm's pre-activation ResNets).

    Raises:
        ValueError: `width` is not a positive int.
    """

    def __init__(
        self,
        width: int = 4,
        num_classes: int = 10,
        in_chans: int = 1,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        zero_init_last: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise ValueError(f"Expected `width` to be a positive int, got {width!r}.")
        self.width = width
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.conv1 = nn.Conv2d(in_chans, width, 3, padding=1, bias=False)
        self.layer1 = nn.Sequential(PreActBlock(width, width))
        self.layer2 = nn.Sequential(PreActBlock(width, 2 * width, stride=2))
        self.layer3 = nn.Sequential(PreActBlock(2 * width, 4 * width, stride=2))
        self.norm = nn.BatchNorm2d(4 * width)
        self.act = nn.ReLU()
        self.feature_info = [
            {"num_chs": width, "reduction": 1, "module": "conv1"},
            {"num_chs": width, "reduction": 1, "module": "layer1"},
            {"num_chs": 2 * width, "reduction": 2, "module": "layer2"},
            {"num_chs": 4 * width, "reduction": 4, "module": "act"},
        ]

        self._init_head(4 * width, num_classes, global_pool)
        init_weights(self, zero_init_last=zero_init_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stem, the three blocks, and the final BatchNorm and ReLU.

        Args:
            x: images, `(B, in_chans, H, W)`.

        Returns:
            Features, `(B, 4 * width, H / 4, W / 4)`.
        """
        x = self.conv1(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.act(self.norm(x))


default_cfgs = generate_default_cfgs(
    {
        "resnet8": make_cfg(
            input_size=(1, 28, 28),
            pool_size=(7, 7),
            mean=MNIST_MEAN,
            std=MNIST_STD,
            origin_url="https://github.com/eksuas/eenets.pytorch",
            paper_name="Early-exit Convolutional Neural Networks",
        ),
    }
)


@register
def resnet8(pretrained: bool = False, **kwargs: Any) -> MnistResNet:
    """The paper's 8-layer ResNet for MNIST, 4 channels wide by default.

    Args:
        pretrained: must be False unless `pretrained_cfg_overlay` points at your own weights; no
            weights are published.
        **kwargs: `width` (4 by default; the paper also uses 2), `num_classes`, `in_chans`,
            `drop_rate`, `global_pool`, `zero_init_last`, or any `timm.create_model` option.

    Returns:
        The model.

    Raises:
        ValueError: `pretrained=True` with no weights to load, or a bad `width`.

    Example:
        >>> import timm, torch, earlyexit
        >>> model = timm.create_model("resnet8", width=2).eval()
        >>> model(torch.zeros(1, 1, 28, 28)).shape
        torch.Size([1, 10])
    """
    return build_model(MnistResNet, "resnet8", pretrained, **kwargs)
