"""Saving and loading early-exit networks as one `.safetensors` file.

The file holds every weight of the net (`backbone.*` and `heads.*`, the keys of
`net.state_dict()`) and, in the safetensors metadata, one JSON document under the key
`earlyexit`: the format version, the library version, the resolved `EarlyExitConfig`, the
backbone's timm architecture and constructor arguments, the exit layout, the MAC counts and
costs, the threshold and a SHA-256 digest of the tensors. Loading never unpickles anything and
never re-profiles the model: the MACs and costs come from the file, and only the cheap tracing
that splits the backbone into stages is redone.

Only what the net itself can tell is recorded about the backbone: its timm architecture name,
`num_classes`, `in_chans` and a non-zero `drop_rate`. A backbone built with other constructor
arguments (a different `drop_path_rate`, widths, a torchvision model, your own class) is
rebuilt by you and passed as `load(path, backbone=model)`.

A file is data, never code: `load` rebuilds a backbone only from a registered timm name and
the plain architecture settings in `ARCHITECTURE_KWARGS`, each a JSON number, string, bool,
null or list of them. Anything else in the file (`checkpoint_path`, `pretrained`,
`pretrained_cfg_overlay`, a `hf-hub:` or `local-dir:` name, ...) would make timm read another
file or fetch weights, so it is refused before timm is called.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from earlyexit._architecture import (
    ARCHITECTURE_KWARGS,
    architecture_text,
    create_backbone,
    describe_backbone,
)
from earlyexit.config import EarlyExitConfig
from earlyexit.errors import CheckpointError, EarlyExitError
from earlyexit.fx.analysis import CutPoint, ModelAnalysis, analyse_model
from earlyexit.fx.split import split_model
from earlyexit.heads import ExitHead
from earlyexit.model import EarlyExitNet

__all__ = ["ARCHITECTURE_KWARGS", "FORMAT_VERSION", "METADATA_KEY", "load", "read_metadata", "save"]

FORMAT_VERSION = 1
"""The version of the file layout that `save` writes and `load` reads (and older)."""

METADATA_KEY = "earlyexit"
"""The safetensors metadata key holding the JSON document."""


def save(net: EarlyExitNet, path: str | os.PathLike[str]) -> None:
    """Write an early-exit network to one `.safetensors` file.

    The write is atomic: the file is written next to `path` under a temporary name and then
    renamed, so `path` either keeps its old content or holds the whole new file, and a failed
    save leaves nothing behind. Tensors that share memory (tied weights) are stored once each.

    Args:
        net: the network to save (a compiled net saves its uncompiled weights).
        path: the file to write, conventionally ending in `.safetensors`.

    Raises:
        TypeError: when `net` is not an `EarlyExitNet`.

    Example:
        >>> import os, tempfile, timm, earlyexit
        >>> from earlyexit.io import load, save
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2)
        >>> path = os.path.join(tempfile.mkdtemp(), "eenet20.safetensors")
        >>> save(net, path)
        >>> load(path).exit_names == net.exit_names
        True
    """
    from safetensors.torch import save_file

    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")
    tensors = _unshared_tensors(net.state_dict())
    metadata = {"format": "pt", METADATA_KEY: json.dumps(_describe(net, tensors))}
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _file_mode(path))  # mkstemp makes it private (0600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read the JSON document that `save` stored in a file, without loading any tensor.

    Args:
        path: a file written by `save`.

    Returns:
        The document: `format_version`, `library_version`, `config`, `backbone`
        (`architecture`, `kwargs`, `class`), `num_classes`, `input_size`, `exit_names`,
        `exit_type`, `heads`, `stage_macs`, `head_macs`, `exit_costs`, `threshold`, `dtype`,
        `sha256`.

    Raises:
        FileNotFoundError: when there is no such file.
        CheckpointError: when the file is not a safetensors file written by `save`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No such file: {path!r}.")
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as err:
        raise CheckpointError(
            f"{path!r} is not a readable safetensors file ({type(err).__name__}: {err}). "
            "Hint: the file is truncated, corrupted or of another format; save it again with "
            "`earlyexit.save(net, path)`."
        ) from err
    if METADATA_KEY not in raw:
        raise CheckpointError(
            f"{path!r} is a safetensors file without earlyexit metadata. Hint: it was not "
            "written by `earlyexit.save`; for bare weights, convert the model and use "
            "`net.load_state_dict(safetensors.torch.load_file(path))`."
        )
    try:
        meta = json.loads(raw[METADATA_KEY])
        version = int(meta["format_version"])
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(
            f"The earlyexit metadata of {path!r} is malformed ({type(err).__name__}: {err}). "
            "Hint: the file was edited or corrupted; save the model again."
        ) from err
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has format version {version}, newer than this earlyexit reads "
            f"({FORMAT_VERSION}). Hint: upgrade earlyexit (the file was written by version "
            f"{meta.get('library_version')})."
        )
    return meta


def load(
    path: str | os.PathLike[str],
    backbone: nn.Module | None = None,
    map_location: str | torch.device = "cpu",
) -> EarlyExitNet:
    """Rebuild an early-exit network from a file written by `save`.

    Without `backbone`, the backbone is created with `timm.create_model(architecture,
    pretrained=False, **kwargs)` from the file (timm models only); `kwargs` may hold only the
    plain settings in `ARCHITECTURE_KWARGS`, so nothing but `path` is ever read. With it, the
    file's weights are loaded into that model, which must be of the saved architecture. Either
    way the model is only traced and split at the saved exits; the MACs and costs come from the
    file. All checks pass before any weight is copied, so a failed load leaves `backbone`
    untouched.

    Args:
        path: a file written by `save`.
        backbone: the model to load the weights into; it becomes the net's `backbone`.
        map_location: the device of the returned net.

    Returns:
        The network, in eval mode, on `map_location`, with the saved threshold.

    Raises:
        FileNotFoundError: when there is no such file.
        CheckpointError: when the file is not a complete earlyexit file, is corrupted, asks
            for backbone arguments other than plain architecture settings, or does not fit
            `backbone` (other architecture, missing or extra tensors).

    Example:
        >>> import os, tempfile, timm, earlyexit
        >>> from earlyexit.io import load, save
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2, threshold=0.8)
        >>> path = os.path.join(tempfile.mkdtemp(), "eenet20.safetensors")
        >>> save(net, path)
        >>> copy = load(path, backbone=timm.create_model("resnet20"))
        >>> copy.threshold, copy.training
        (0.8, False)
    """
    from safetensors.torch import load_file

    if backbone is not None and not isinstance(backbone, nn.Module):
        raise TypeError(f"Expected `backbone` to be an nn.Module, got {type(backbone).__name__}.")
    if isinstance(backbone, EarlyExitNet):
        raise TypeError("`backbone` is an EarlyExitNet. Hint: pass its `backbone`.")
    path = os.fspath(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(path, device="cpu")
    except Exception as err:
        raise CheckpointError(
            f"The tensors of {path!r} cannot be read ({type(err).__name__}: {err}). Hint: "
            "the file is truncated or corrupted; save the model again."
        ) from err
    if meta.get("sha256") is not None and _digest(tensors) != meta["sha256"]:
        raise CheckpointError(
            f"The tensors of {path!r} do not match the checksum stored with them. Hint: the "
            "file is corrupted; save the model again."
        )
    try:
        config = EarlyExitConfig.from_dict(meta["config"])
        stage_macs = [int(m) for m in meta["stage_macs"]]
        head_macs = [int(m) for m in meta["head_macs"]]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"The earlyexit metadata of {path!r} is incomplete ({type(err).__name__}: {err}). "
            "Hint: the file was edited or corrupted; save the model again."
        ) from err
    if config.exit_names is None or config.input_size is None:
        raise CheckpointError(
            f"The saved config of {path!r} has no `exit_names` or `input_size`. Hint: the "
            "file was edited or corrupted; save the model again."
        )
    n = config.n_exits
    if len(stage_macs) != n + 1 or len(head_macs) != n or sum(stage_macs) <= 0:
        raise CheckpointError(
            f"The saved MAC counts of {path!r} do not fit {n} exits: stage_macs={stage_macs}, "
            f"head_macs={head_macs}. Hint: the file was edited or corrupted; save the model "
            "again."
        )
    rebuilt = backbone is None
    if rebuilt:
        backbone = create_backbone(meta, path)
    try:
        analysis = analyse_model(backbone, tuple(config.input_size))
        cuts = _saved_cut_points(analysis, config, meta.get("heads"))
        # Files name the exits as the library did when they were saved: an older name is an
        # alias of the same cut point.
        config.exit_names = [c.name for c in cuts]
        staged = split_model(analysis, config.exit_names)
    except EarlyExitError as err:
        raise CheckpointError(
            f"{path!r} does not fit {type(backbone).__name__}: {err} Hint: pass the backbone "
            f"the file was saved from ({architecture_text(meta)})."
        ) from err
    # Files from before `conv` heads kept a layout averaged each head's map into one cell.
    layouts = [h.get("layout", 1) for h in meta.get("heads") or [{} for _ in cuts]]
    try:
        heads = [
            ExitHead(config.exit_type, c.shape, c.channel_axis, staged.num_classes, layout=g)
            for c, g in zip(cuts, layouts, strict=True)
        ]
    except ValueError as err:
        raise CheckpointError(
            f"The exit heads recorded in {path!r} are malformed: {err} Hint: the file was "
            "edited or corrupted; save the model again."
        ) from err
    net = EarlyExitNet(backbone, staged, heads, config, stage_macs=stage_macs, head_macs=head_macs)
    tensors = _with_logit_p_input(net, tensors)
    _check_tensors(net, tensors, path, meta)
    net.load_state_dict(tensors, strict=True)
    dtype = getattr(torch, str(meta.get("dtype")), None)
    if rebuilt and isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        net.to(dtype=dtype)
    net.to(map_location)
    return net.eval()


def _saved_cut_points(
    analysis: ModelAnalysis,
    config: EarlyExitConfig,
    saved_heads: Sequence[Mapping[str, Any]] | None,
) -> list[CutPoint]:
    """The cut point of each saved exit, checked against the head layout the file recorded.

    Args:
        analysis: the traced backbone.
        config: the saved config.
        saved_heads: per exit, the `shape` and `channel_axis` the file recorded.

    Raises:
        CheckpointError: when a cut point is missing or the exit layout does not fit.
    """
    names = list(config.exit_names or [])
    found = {name: analysis.find(name) for name in names}
    missing = [name for name, cut in found.items() if cut is None]
    if missing:
        raise CheckpointError(
            f"it has no cut point named {missing} at input size {tuple(config.input_size or ())}."
        )
    cuts = [found[name] for name in names]
    saved_heads = list(saved_heads) if saved_heads is not None else []
    if saved_heads and len(saved_heads) != len(names):
        raise CheckpointError(
            f"the file describes {len(saved_heads)} exit heads, not {len(names)}."
        )
    for i, (cut, saved) in enumerate(zip(cuts[: len(saved_heads)], saved_heads, strict=True)):
        shape, axis = tuple(saved["shape"]), int(saved["channel_axis"])
        if (shape, axis) != (cut.shape, cut.channel_axis):
            raise CheckpointError(
                f"exit {i} ({cut.name}) sees a feature of shape {cut.shape} (channel axis "
                f"{cut.channel_axis}), but the file was saved with {shape} (channel axis {axis})."
            )
    return cuts  # type: ignore[return-value]


def _file_mode(path: str) -> int:
    """The mode a plain `open(path, "wb")` would give: the old file's, else 0666 less umask."""
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def _unshared_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached CPU tensors that own their memory, as safetensors requires."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for key, value in state.items():
        t = value.detach()
        storage = t.untyped_storage()
        ident = (str(t.device), storage.data_ptr())
        whole = t.is_contiguous() and t.storage_offset() == 0
        whole = whole and storage.nbytes() == t.numel() * t.element_size()
        if ident in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(ident)
        out[key] = t.cpu()
    return out


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of the tensors, in name order."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype!s}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _describe(net: EarlyExitNet, tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    from earlyexit import __version__

    floats = [p.dtype for p in net.parameters() if p.is_floating_point()]
    return {
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": net.config.to_dict(),
        "backbone": describe_backbone(net.backbone, net.config.input_size, net.num_classes),
        "num_classes": net.num_classes,
        "input_size": list(net.input_size),
        "exit_names": net.exit_names,
        "exit_type": net.config.exit_type,
        "heads": [
            {"shape": list(h.shape), "channel_axis": h.channel_axis, "layout": h.layout}
            for h in net.heads
        ],
        "stage_macs": list(net.stage_macs),
        "head_macs": list(net.head_macs),
        "exit_costs": [float(c) for c in net.exit_costs.tolist()],
        "threshold": net.threshold,
        "dtype": str(floats[0]).removeprefix("torch.") if floats else None,
        "sha256": _digest(tensors),
    }


def _with_logit_p_input(
    net: EarlyExitNet, tensors: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """Files from before `conv` heads' confidence saw logit p (its last input): weight 0 there.

    Such a confidence computed exactly what the padded one computes, so the file loads as it
    was saved.
    """
    padded = dict(tensors)
    for k, head in enumerate(net.heads):
        if head.exit_type != "conv":
            continue
        key = f"heads.{k}.confidence.weight"
        old = tensors.get(key)
        want = head.confidence.weight.shape
        if old is not None and old.ndim == 2 and tuple(old.shape) == (want[0], want[1] - 1):
            padded[key] = torch.cat((old, old.new_zeros(want[0], 1)), dim=1)
    return padded


def _check_tensors(
    net: EarlyExitNet, tensors: Mapping[str, torch.Tensor], path: str, meta: Mapping[str, Any]
) -> None:
    """Every key present with its shape, nothing extra: checked before anything is copied."""
    expected = net.state_dict()
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if not (missing or extra or wrong):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("shape mismatch", wrong)):
        if items:
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            parts.append(f"{label}: {', '.join(items[:5])}{more}")
    raise CheckpointError(
        f"The tensors of {path!r} do not fit the {type(net.backbone).__name__} net built for "
        f"them ({'; '.join(parts)}). "
        f"Hint: the file was saved from {architecture_text(meta)}; pass that backbone."
    )
