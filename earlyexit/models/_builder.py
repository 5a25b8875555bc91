"""Private mechanics shared by the backbones: registration, pretrained cfgs and the timm builder."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from timm.models import (
    build_model_with_cfg,
    is_model,
    model_entrypoint,
    register_model,
    resolve_pretrained_cfg,
)
from torch import nn

from earlyexit.errors import EarlyExitWarning

__all__ = ["build_model", "make_cfg", "register"]

EntryPointT = TypeVar("EntryPointT", bound=Callable[..., nn.Module])
ModelT = TypeVar("ModelT", bound=nn.Module)

# Fields of a pretrained cfg that point at weights; a cfg with none of them has nothing to load.
_WEIGHT_SOURCES = ("url", "file", "state_dict", "hf_hub_id")


def register(fn: EntryPointT) -> EntryPointT:
    """Register a model entry point in timm, unless another library's model has the name.

    A name that is free, or that holds one of ours (a module reloaded), is registered quietly.
    A name that timm or another package already uses keeps its model: importing earlyexit must
    not change what `timm.create_model(name)` builds elsewhere in the program, so ours is
    skipped with an `EarlyExitWarning` (its class, `CifarResNet` or `MnistResNet`, still builds it).

    Args:
        fn: the entry point, registered under its `__name__`.

    Returns:
        `fn`, unchanged.
    """
    name = fn.__name__
    if is_model(name):
        current = model_entrypoint(name)
        owner = getattr(current, "__module__", None) or ""
        if owner.partition(".")[0] != __name__.partition(".")[0]:
            warnings.warn(
                f"timm already has a model named {name!r} (from {owner or 'elsewhere'}), so "
                f"earlyexit does not register its own {name!r} and `timm.create_model({name!r})` "
                "still builds that one. Hint: to use ours, build it from its class in "
                f"`{fn.__module__}` and pass `input_size` to `earlyexit.convert`.",
                EarlyExitWarning,
                stacklevel=2,
            )
            return fn
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
        return register_model(fn)


def make_cfg(**kwargs: Any) -> dict[str, Any]:
    """A pretrained cfg for one of our backbones: no weights, crop-free, `conv1` / `fc` named.

    Args:
        **kwargs: fields that override or extend the defaults (`input_size`, `mean`, `std`, …).

    Returns:
        A dict that `timm.models.generate_default_cfgs` accepts.
    """
    return {
        "url": "",
        "num_classes": 10,
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "first_conv": "conv1",
        "classifier": "fc",
        "license": "mit",
        **kwargs,
    }


def build_model(
    model_cls: type[ModelT],
    variant: str,
    pretrained: bool = False,
    num_feature_levels: int = 4,
    **kwargs: Any,
) -> ModelT:
    """Build `variant` with timm's builder; refuse `pretrained=True` when there is nothing to load.

    Args:
        model_cls: the model class.
        variant: the registered model name.
        pretrained: load weights from the pretrained cfg. No weights are published for our models,
            so this works only when the caller points the cfg at their own weights
            (`pretrained_cfg_overlay=dict(file=...)`).
        num_feature_levels: length of the model's `feature_info`; `features_only=True` returns
            all of them unless `out_indices` says otherwise.
        **kwargs: passed on to `timm.models.build_model_with_cfg` and the model class.

    Returns:
        The model, or its feature extractor when `features_only=True`.

    Raises:
        ValueError: `pretrained=True` and the pretrained cfg names no weights.
    """
    if pretrained:
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        if not any(getattr(cfg, key, None) for key in _WEIGHT_SOURCES):
            raise ValueError(
                f"No pretrained weights are published for `{variant}`, got pretrained=True. "
                f"Hint: create it with pretrained=False and train it, or load your own weights "
                f"with `timm.create_model('{variant}', checkpoint_path='weights.pth')`."
            )
    return build_model_with_cfg(
        model_cls,
        variant,
        pretrained,
        feature_cfg={"out_indices": tuple(range(num_feature_levels))},
        **kwargs,
    )
