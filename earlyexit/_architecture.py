"""The backbone a saved file names, and rebuilding it from plain architecture settings only.

A file records only what a net can tell about its backbone: the timm architecture name,
`num_classes`, `in_chans` and a non-zero `drop_rate`. `load` rebuilds a backbone from a
registered timm name and the plain settings in `ARCHITECTURE_KWARGS`, each a JSON number,
string, bool, null or list of them; anything else (`checkpoint_path`, `pretrained`, a `hf-hub:`
name, ...) would make timm read another file or fetch weights, so it is refused before timm is
called.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from earlyexit.errors import CheckpointError

__all__ = ["ARCHITECTURE_KWARGS", "architecture_text", "create_backbone", "describe_backbone"]

ARCHITECTURE_KWARGS = frozenset(
    {
        # What `save` writes.
        "num_classes",
        "in_chans",
        "drop_rate",
        # The paper's backbones.
        "depth",
        "width",
        "widths",
        "shortcut",
        "zero_init_last",
        # Plain shape and regularisation settings of timm's families.
        "global_pool",
        "drop_path_rate",
        "drop_block_rate",
        "output_stride",
        "img_size",
        "patch_size",
        "embed_dim",
        "depths",
        "dims",
        "layers",
        "num_heads",
        "mlp_ratio",
        "window_size",
        "growth_rate",
        "block_config",
        "channels",
        "class_token",
        "qkv_bias",
    }
)
"""The timm constructor arguments `load` passes on when it rebuilds a backbone from a file.

An explicit list of architecture settings: none of them names a file, a URL or weights, so
a crafted file cannot make `load` read anything but itself.
"""

_FILE_WORDS = re.compile(r"checkpoint|pretrained|file|path|url|overlay|hub|cache|dir")


def describe_backbone(
    model: nn.Module, input_size: Sequence[int] | None, num_classes: int
) -> dict[str, Any]:
    """The timm architecture and the constructor arguments that the model itself reveals."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, Mapping) else None
    kwargs: dict[str, Any] = {"num_classes": int(getattr(model, "num_classes", num_classes))}
    in_chans = input_size[0] if input_size else None
    first = cfg.get("first_conv") if isinstance(cfg, Mapping) else None
    if isinstance(first, str):
        with contextlib.suppress(AttributeError):
            in_chans = int(model.get_submodule(first).in_channels)
    if in_chans is not None:
        kwargs["in_chans"] = int(in_chans)
    drop_rate = getattr(model, "drop_rate", None)
    if isinstance(drop_rate, float) and drop_rate > 0:
        kwargs["drop_rate"] = drop_rate
    return {
        "architecture": arch,
        "kwargs": kwargs,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
    }


def architecture_text(meta: Mapping[str, Any]) -> str:
    spec = meta.get("backbone") or {}
    arch = spec.get("architecture")
    if arch:
        return f"timm.create_model({arch!r}, **{spec.get('kwargs')})"
    return f"a {spec.get('class', 'model')}"


def create_backbone(meta: Mapping[str, Any], path: str) -> nn.Module:
    import timm

    spec = meta.get("backbone") or {}
    arch = spec.get("architecture")
    if not arch:
        raise CheckpointError(
            f"{path!r} was saved from a {spec.get('class', 'model')} that is not a timm model, "
            "so it cannot be rebuilt from the file. Hint: create the model yourself and pass "
            "it: `earlyexit.load(path, backbone=model)`."
        )
    kwargs = _architecture_kwargs(arch, spec.get("kwargs"), path)
    try:
        return timm.create_model(arch, pretrained=False, **kwargs)
    except Exception as err:
        raise CheckpointError(
            f"timm cannot create {arch!r} with {kwargs} ({type(err).__name__}: {err}). Hint: "
            "import the module that registers it, or create the model yourself and pass it: "
            "`earlyexit.load(path, backbone=model)`."
        ) from err


def _architecture_kwargs(arch: object, kwargs: object, path: str) -> dict[str, Any]:
    """The file's backbone arguments, refused unless each is a plain architecture setting."""
    if not isinstance(arch, str) or ":" in arch or "/" in arch or "\\" in arch:
        raise CheckpointError(
            f"{path!r} names the backbone architecture {arch!r}, which is not a timm model "
            "name: earlyexit rebuilds only registered timm models, never from the Hub or a "
            "folder. Hint: create the model yourself and pass it: "
            "`earlyexit.load(path, backbone=model)`."
        )
    if kwargs is None:
        return {}
    if not isinstance(kwargs, Mapping):
        raise CheckpointError(
            f"The backbone arguments in {path!r} are a {type(kwargs).__name__}, not a mapping. "
            "Hint: the file was edited or corrupted; save the model again."
        )
    for key, value in kwargs.items():
        if key not in ARCHITECTURE_KWARGS:
            why = (
                "it would make timm read another file or fetch weights"
                if _FILE_WORDS.search(str(key))
                else "it is not an architecture setting earlyexit rebuilds a backbone with"
            )
            raise CheckpointError(
                f"{path!r} asks to create {arch!r} with {key!r}={value!r}, which load refuses: "
                f"{why}. Hint: a file written by `earlyexit.save` never holds it; create the "
                "model yourself and pass it: `earlyexit.load(path, backbone=model)`."
            )
        if not _is_plain(value):
            raise CheckpointError(
                f"{path!r} asks to create {arch!r} with {key!r}={value!r}, which load refuses: "
                "an architecture setting is a JSON number, string, bool, null or list of them. "
                "Hint: the file was edited or corrupted; save the model again, or create the "
                "model yourself and pass it: `earlyexit.load(path, backbone=model)`."
            )
    return dict(kwargs)


def _is_plain(value: object) -> bool:
    """A JSON scalar, or a (nested) list of them."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and all(_is_plain(v) for v in value)
