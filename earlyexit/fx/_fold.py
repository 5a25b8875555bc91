"""Eval-mode stages whose batch norms are folded into the convolutions before them.

In eval mode a batch norm is a fixed affine map per channel, y = (x − μ) · s + β with
s = γ / √(σ² + ε). After a convolution it can be folded into the convolution's weights and
bias (W' = W · s, b' = (b − μ) · s + β), so the pair becomes one convolution. That saves a
full pass over the activation and its allocation: at 32×32 with 16 channels, where
convolutions are cheap per byte, the batch norms of a CIFAR ResNet took 15-20 % of a stage's
CPU time.

`fold_batchnorm` returns a copy of a stage in which each `Conv1d/2d/3d → BatchNorm1d/2d/3d`
pair (exactly these classes, the convolution's output read by nothing else) runs as one
`FoldedConvBN`. The folded weights are made from the modules' own parameters and running
statistics the first time they are needed, and made again, in the same tensors, whenever one
of them has changed since in a way PyTorch tracks (an optimizer step, `load_state_dict`: the
tensors' version counters and storage say so; the norm's `eps`; its batch count, which moves
when train mode updates the statistics without a version bump), or when `invalidate` is
called (`StagedGraph.train` does, at every mode switch). An in-place edit through `.data` is
invisible to all of these until the next mode switch. With autograd on, a batch norm in train
mode, a forward hook on either module, a weight recomputed by a hook (pruning) or inference
tensors, the pair runs as it is written. The results equal the unfolded stage's up to
rounding (the products are formed in a different order).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import fx, nn

__all__ = ["FoldedConvBN", "copy_stage", "fold_batchnorm", "folded_pairs", "free_name"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


# The hooks registered for every module (`register_module_forward_hook`), mutated in place.
_GLOBAL_PRE_HOOKS = nn.modules.module._global_forward_pre_hooks
_GLOBAL_HOOKS = nn.modules.module._global_forward_hooks


class FoldedConvBN(nn.Module):
    """A convolution and the eval-mode batch norm after it, run as one folded convolution.

    It holds the two modules themselves (shared, not copied); with autograd on or the norm in
    train mode it runs them as they are.

    Args:
        conv: a `Conv1d`, `Conv2d` or `Conv3d`.
        bn: the `BatchNorm1d/2d/3d` applied to its output, with running statistics.
    """

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None
        self._bias: torch.Tensor | None = None

    def source_key(self) -> tuple | None:
        """What folded tensors would be made from now, or None where the pair must run unfolded.

        The key holds each source's version counter and storage, the norm's `eps` and its
        batch count (a norm in train mode updates its statistics without a version bump, but
        counts the batch). None: a forward hook on either module (or on every module), a
        `forward` replaced on the instance, a weight recomputed by a hook (pruning, the old
        `weight_norm`), or inference tensors, whose changes no counter tracks. It runs before
        every folded convolution, so it reads the modules' tables directly.
        """
        conv, bn = self.conv, self.bn
        cp, bb = conv._parameters, bn._buffers
        w, var = cp.get("weight"), bb.get("running_var")
        if (
            w is None
            or var is None
            or conv._forward_pre_hooks
            or conv._forward_hooks
            or bn._forward_pre_hooks
            or bn._forward_hooks
            or _GLOBAL_PRE_HOOKS
            or _GLOBAL_HOOKS
            or "forward" in conv.__dict__
            or "forward" in bn.__dict__
            or w.is_inference()
            or var.is_inference()
        ):
            return None
        bp, mean, count = bn._parameters, bb["running_mean"], bb.get("num_batches_tracked")
        bias, gamma, beta = cp.get("bias"), bp.get("weight"), bp.get("bias")
        return (
            w._version,
            w.data_ptr(),
            mean._version,
            mean.data_ptr(),
            var._version,
            var.data_ptr(),
            bn.eps,
            None if count is None else count._version,
            None if bias is None else (bias._version, bias.data_ptr()),
            None if gamma is None else (gamma._version, gamma.data_ptr()),
            None if beta is None else (beta._version, beta.data_ptr()),
        )

    def invalidate(self) -> None:
        """Fold again, into the same tensors, at the next use (whatever the version counters)."""
        self._key = None

    def invalidated(self) -> bool:
        """Whether it folds again at the next use whatever the version counters say."""
        return self._key is None

    def folded(self, key: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight and bias, made again (in the same tensors) if a source changed.

        Args:
            key: `source_key()`, when the caller has it already.
        """
        key = self.source_key() if key is None else key
        if self._weight is None or key != self._key:
            weight, bias = self._fold()
            if self._weight is not None and _same(self._weight, weight):
                # Write into the tensors already handed out: a captured CUDA graph reads them.
                self._weight.copy_(weight)
                self._bias.copy_(bias)
            else:
                self._weight, self._bias = weight, bias
            self._key = key
        return self._weight, self._bias

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        conv, bn = self.conv, self.bn
        w = conv.weight
        dtype = torch.promote_types(w.dtype, torch.float32)  # fold in at least float32
        # Normal tensors even under `inference_mode`: they are written again in place later.
        with torch.inference_mode(False), torch.no_grad():
            scale = (bn.running_var.to(dtype) + bn.eps).rsqrt()
            if bn.weight is not None:
                scale = scale * bn.weight.to(dtype)
            mean = bn.running_mean.to(dtype)
            bias = -mean * scale if conv.bias is None else (conv.bias.to(dtype) - mean) * scale
            if bn.bias is not None:
                bias = bias + bn.bias.to(dtype)
            # Elementwise with the weight first: the product keeps its layout (channels_last).
            weight = w.to(dtype) * scale.reshape(-1, *([1] * (w.ndim - 1)))
            return weight.to(w.dtype), bias.to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = None if self.bn.training or torch.is_grad_enabled() else self.source_key()
        if key is None:
            return self.bn(self.conv(x))
        weight, bias = self.folded(key)
        return self.conv._conv_forward(x, weight, bias)


def folded_pairs(stages: Iterable[nn.Module]) -> list[FoldedConvBN]:
    """Every `FoldedConvBN` in the given stages, in order."""
    return [m for stage in stages for m in stage.modules() if isinstance(m, FoldedConvBN)]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """Exactly a plain convolution and a plain batch norm with running statistics, matching."""
    return (
        type(conv) in _CONVS
        and type(bn) in _NORMS
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.running_var is not None
        and bn.num_features == conv.out_channels
        and _NORMS.index(type(bn)) == _CONVS.index(type(conv))
    )


def copy_stage(stage: fx.GraphModule) -> fx.GraphModule:
    """A new `GraphModule` with a copy of the stage's graph, sharing its modules and mode."""
    gm = fx.GraphModule(stage, copy.deepcopy(stage.graph), class_name=type(stage).__name__)
    gm.training = stage.training
    return gm


def fold_batchnorm(stage: fx.GraphModule) -> fx.GraphModule:
    """A copy of an eval-mode stage in which each conv → batch norm pair is one `FoldedConvBN`.

    The copy shares the stage's modules, parameters and buffers; only its graph differs (and
    the folded modules it adds).

    Args:
        stage: an eval-mode stage.

    Returns:
        The rewritten stage (a new `GraphModule`, also when nothing could be folded).
    """
    gm = copy_stage(stage)
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        source = node.args[0]
        if not isinstance(source, fx.Node) or source.op != "call_module" or source.kwargs:
            continue
        if len(source.users) != 1 or len(source.args) != 1:
            continue
        conv, bn = gm.get_submodule(source.target), gm.get_submodule(node.target)
        if not _foldable(conv, bn):
            continue
        name = free_name(gm, f"{source.target}_bn".replace(".", "_"))
        gm.add_submodule(name, FoldedConvBN(conv, bn))
        source.target = name
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm


def free_name(gm: nn.Module, base: str) -> str:
    """`base`, or `base_1`, `base_2`, ...: the first that is not an attribute of `gm` yet."""
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name
