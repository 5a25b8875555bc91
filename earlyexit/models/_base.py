"""Private base class: the timm classifier interface our backbones share."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import create_classifier
from torch import nn

__all__ = ["TimmClassifier", "init_weights"]


class TimmClassifier(nn.Module):
    """Global pool → dropout → `fc` head and the timm model interface around it.

    Subclasses build their trunk, call `_init_head`, and implement `forward_features`.

    Attributes:
        num_classes: size of the output; 0 means the head returns pooled features.
        in_chans: channels of the input image.
        num_features: channels of the last feature map.
        head_hidden_size: width of the features `fc` sees (`num_features` unless the pool concats).
        drop_rate: dropout probability before `fc`.
        feature_info: one dict per feature level (`num_chs`, `reduction`, `module`).
    """

    num_classes: int
    in_chans: int
    num_features: int
    head_hidden_size: int
    drop_rate: float
    feature_info: list[dict[str, int | str]]

    def _init_head(self, num_features: int, num_classes: int, global_pool: str) -> None:
        self.num_features = num_features
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            num_features, num_classes, pool_type=global_pool
        )
        self.head_hidden_size = num_features * self.global_pool.feat_mult()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Regexes that group parameters by stem and block, for timm's layer-wise optimizers.

        Args:
            coarse: group by stage instead of by block.

        Returns:
            `{"stem": ..., "blocks": ...}` patterns over parameter names; a final `norm` goes with
            the last group.
        """
        blocks = r"^layer(\d+)" if coarse else r"^layer(\d+)\.(\d+)"
        return {"stem": r"^conv1|^bn1", "blocks": [(blocks, None), (r"^norm", (99999,))]}

    @torch.jit.ignore
    def get_classifier(self, name_only: bool = False) -> nn.Module | str:
        """The final classifier.

        Args:
            name_only: return its qualified name (`"fc"`) instead of the module.

        Returns:
            The classifier module, or its name.
        """
        return "fc" if name_only else self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialised one.

        Args:
            num_classes: size of the new output; 0 makes the head return pooled features.
            global_pool: pooling type (`"avg"`, `"max"`, `"avgmax"`, `"catavgmax"`, `""`); the
                current one is kept when `None`.
        """
        if global_pool is None:
            global_pool = self.global_pool.pool_type
        reference = next(self.parameters())
        self.num_classes = num_classes
        self.global_pool, self.fc = create_classifier(
            self.num_features, num_classes, pool_type=global_pool
        )
        self.global_pool.to(device=reference.device, dtype=reference.dtype)
        self.fc.to(device=reference.device, dtype=reference.dtype)
        self.head_hidden_size = self.num_features * self.global_pool.feat_mult()
        self.global_pool.train(self.training)
        self.fc.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The trunk: image to last feature map.

        Args:
            x: images, `(B, in_chans, H, W)`.

        Returns:
            Features, `(B, num_features, H', W')`.
        """
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The head: last feature map to logits.

        Args:
            x: features from `forward_features`.
            pre_logits: stop before `fc` and return the pooled (and dropped-out) features.

        Returns:
            Logits `(B, num_classes)`, or pooled features `(B, head_hidden_size)`.
        """
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images to logits.

        Args:
            x: images, `(B, in_chans, H, W)`.

        Returns:
            Logits, `(B, num_classes)`.
        """
        return self.forward_head(self.forward_features(x))


def init_weights(model: nn.Module, zero_init_last: bool = False) -> None:
    """He-normal convolutions (fan-out), unit-scale zero-shift BatchNorm, as in He et al. 2016.

    Args:
        model: initialised in place.
        zero_init_last: also call `zero_init_last()` on every block that has it, so that each
            residual branch starts at zero and each block as the identity (Goyal et al. 2017).
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if zero_init_last:
        for module in model.modules():
            if hasattr(module, "zero_init_last"):
                module.zero_init_last()
