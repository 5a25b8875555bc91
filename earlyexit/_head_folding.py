"""A `conv` exit head run for inference with its batch norm and layout pool folded away.

In eval mode with autograd off, a channels-first `conv` head computes

    avg pool → conv → batch norm → ReLU → [2×2 layout pool] → flatten → classifier, and
    confidence(cat(features, certainty(logits))).

The batch norm folds into the convolution's weights (as in the stages, `FoldedConvBN`).
The layout pool, the flattening and the two linear branches are linear in the ReLU's output,
so they fold into one matrix with K + 1 rows over the whole (C, H, W) map: the class logits
and the feature part of the confidence logit come out of one matrix product, read straight
from the convolution's output in its own memory layout (no copy for channels-last maps).
The certainty part of the confidence logit is added after it (one `addmv`). A head then
runs about 18 kernels instead of 22: no batch norm, no second pool, no copy to flatten a
channels-last map, no concatenation. On ResNet-110 at batch 256 on a 2-core CPU the ten
heads took 4-11 % less time alone.

The folded tensors are made from the head's own parameters and buffers the first time they
are needed, and made again, into the same tensors, when one of them changes in a way PyTorch
tracks (see `FoldedConvBN.source_key`), or after `invalidate` (`EarlyExitNet.train` calls
it). The results equal the head's eval-mode ops up to float rounding; untrained, the
confidence is still exactly the max-softmax prior of its own logits (its feature weights are
zero). `EarlyExitNet` gives early-exit inference these heads (`_inference_heads`), and the
CUDA-graph runner captures them (`refresh` folds again before a replay); `forward_all`,
training and export use the heads as written.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from earlyexit.fx._fold import _GLOBAL_HOOKS, _GLOBAL_PRE_HOOKS, FoldedConvBN, _same
from earlyexit.heads import ExitHead, certainty

__all__ = ["FoldedConvHead", "InferenceHead", "inference_heads"]


def _plain(module: nn.Module) -> bool:
    """No hooks on the module and no `forward` replaced on the instance."""
    return not (module._forward_pre_hooks or module._forward_hooks or "forward" in module.__dict__)


def _refresh(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """`new`, written into `old` where it fits: a captured CUDA graph reads the old tensor."""
    if old is not None and _same(old, new):
        return old.copy_(new)
    return new


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else (t._version, t.data_ptr(), t.dtype, t.device)


class FoldedConvHead:
    """The folded inference form of one channels-first `conv` `ExitHead`.

    Not a module: it holds no parameters of its own, only tensors made from the head's, so
    the head's `state_dict`, `to()` and saved files do not see it.

    Args:
        head_conv: the head's `conv` sequence: average pool, convolution, batch norm, ReLU
            and, where the head keeps a layout of several cells, the layout pool.
        classifier: the classification branch, on the (pooled) features flattened.
        confidence: the confidence branch, on the features and then the 3 certainty inputs.
        cell: the layout pool's window over the convolution's output, as (rows, columns); the
            whole map where the head averages it into one cell.
    """

    def __init__(
        self,
        head_conv: nn.Sequential,
        classifier: nn.Linear,
        confidence: nn.Linear,
        cell: tuple[int, int],
    ) -> None:
        self.pool = head_conv[0]
        self.folded_conv = FoldedConvBN(head_conv[1], head_conv[2])
        self.classifier = classifier
        self.confidence = confidence
        self.cell = cell
        # Every module the folded form stands in for: a hook on any of them disables it.
        self.stands_for = (head_conv, *head_conv, classifier, confidence)
        self._key: tuple | None = None
        self._matrices: dict[bool, torch.Tensor] = {}  # channels_last → (K + 1, C·H·W)
        self._bias: torch.Tensor | None = None
        self._certainty: torch.Tensor | None = None
        self._shape: tuple[int, int, int] | None = None  # the map the matrices were made for

    def matches(
        self, head_conv: nn.Sequential, classifier: nn.Module, confidence: nn.Module
    ) -> bool:
        """Whether it was made from these modules (a head's modules may be replaced)."""
        return (head_conv, *head_conv, classifier, confidence) == self.stands_for

    def applies(self) -> bool:
        """Whether the folded form may run now: no hooks, the norm in eval mode."""
        if _GLOBAL_PRE_HOOKS or _GLOBAL_HOOKS or self.folded_conv.bn.training:
            return False
        return all(_plain(m) for m in self.stands_for)

    def invalidate(self) -> None:
        """Fold again, into the same tensors, at the next use (whatever the version counters)."""
        self._key = None
        self.folded_conv.invalidate()

    def invalidated(self) -> bool:
        """Whether it folds again at the next use whatever the version counters say."""
        return self._key is None or self.folded_conv.invalidated()

    def refresh(self) -> None:
        """Fold again now, into the same tensors, where a source changed since the last use:
        for a captured CUDA graph, which replays the ops without these checks."""
        pair = self.folded_conv
        key = pair.source_key()
        if key is not None:
            pair.folded(key)
        linear_key = self._linear_key()
        if self._shape is not None and linear_key is not None:
            self._linear(False, self._shape, linear_key)

    def _linear_key(self) -> tuple | None:
        cls, conf = self.classifier._parameters, self.confidence._parameters
        weights = (cls.get("weight"), conf.get("weight"))
        if any(w is None or w.is_inference() for w in weights):
            return None  # a parametrized weight, or inference tensors: no counter tracks them
        return tuple(_tensor_key(t) for t in (*weights, cls.get("bias"), conf.get("bias")))

    def _linear(
        self, channels_last: bool, shape: tuple[int, int, int], linear_key: tuple
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The merged matrix for a (C, H, W) map in that layout, its bias, and the certainty
        inputs' weights; made again when a source changed."""
        key = (linear_key, shape)
        self._shape = shape
        if key != self._key:
            matrices, bias, inputs_weight = self._fold_linear(shape)
            self._matrices = {k: _refresh(self._matrices.get(k), m) for k, m in matrices.items()}
            self._bias = _refresh(self._bias, bias)
            self._certainty = _refresh(self._certainty, inputs_weight)
            self._key = key
        return self._matrices[channels_last], self._bias, self._certainty

    def _fold_linear(
        self, shape: tuple[int, int, int]
    ) -> tuple[dict[bool, torch.Tensor], torch.Tensor, torch.Tensor]:
        cls, conf = self.classifier, self.confidence
        features = cls.in_features
        channels, height, width = shape
        rows, cols = self.cell
        with torch.inference_mode(False), torch.no_grad():
            weight = torch.cat((cls.weight, conf.weight[:, :features].to(cls.weight.dtype)))
            # Each pooled cell's weight, spread over the cell's positions and divided by its size.
            grid = weight.reshape(len(weight), channels, height // rows, width // cols)
            full = grid.repeat_interleave(rows, 2).repeat_interleave(cols, 3) / (rows * cols)
            matrices = {
                False: full.reshape(len(weight), -1).contiguous(),
                True: full.permute(0, 2, 3, 1).reshape(len(weight), -1).contiguous(),
            }
            parts = ((cls.bias, cls.out_features), (conf.bias, 1))
            bias = torch.cat(
                [weight.new_zeros(n) if b is None else b.to(weight.dtype) for b, n in parts]
            )
            inputs_weight = conf.weight[0, features:].to(weight.dtype).clone()
        return matrices, bias, inputs_weight

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`(class_logits, confidence_logit)` for `x` `(B, C, H, W)`, or None where the batch
        norm or the linear branches cannot be folded now (then the caller runs the head's ops
        as written)."""
        pair = self.folded_conv
        key, linear_key = pair.source_key(), self._linear_key()
        if key is None or linear_key is None:
            return None
        weight, bias = pair.folded(key)
        y = pair.conv._conv_forward(self.pool(x), weight, bias).relu_()
        channels_last = not y.is_contiguous() and y.is_contiguous(memory_format=torch.channels_last)
        matrix, linear_bias, certainty_weight = self._linear(
            channels_last, tuple(y.shape[1:]), linear_key
        )
        return self.tail(y, channels_last, matrix, linear_bias, certainty_weight)

    def tail(
        self,
        y: torch.Tensor,
        channels_last: bool,
        matrix: torch.Tensor,
        bias: torch.Tensor,
        certainty_weight: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The outputs from the ReLU's output `y` and the folded tensors (what a captured
        graph replays after the convolution)."""
        flat = (y.permute(0, 2, 3, 1) if channels_last else y).flatten(1)  # a view
        out = F.linear(flat, matrix, bias)
        num_classes = self.classifier.out_features
        logits = out[:, :num_classes].contiguous()
        inputs = certainty(logits)
        # All three in the logits' dtype (autocast's, where it is on): one fused op, no cast.
        return logits, torch.addmv(out[:, num_classes], inputs, certainty_weight.to(inputs.dtype))


class InferenceHead(nn.Module):
    """An exit head as early-exit inference runs it: folded where it may, else as written.

    Folded (see the module docstring) in eval mode with autograd off, on a plain 4-d tensor,
    with no tracer or compiler looking on and no hook on the head or its modules; the head
    itself otherwise. It shares the head's modules and adds no parameters.

    Args:
        head: a channels-first `conv` `ExitHead`.
    """

    def __init__(self, head: ExitHead) -> None:
        super().__init__()
        self.head = head
        self._folded: FoldedConvHead | None = None

    def folded_form(self) -> FoldedConvHead:
        """The head's folded form, made anew where the head's modules were replaced."""
        head, folded = self.head, self._folded
        if folded is None or not folded.matches(head.conv, head.classifier, head.confidence):
            folded = FoldedConvHead(head.conv, head.classifier, head.confidence, head._fold_cell)
            self._folded = folded
        return folded

    def invalidate(self) -> None:
        """Fold again at the next use (`EarlyExitNet.train` calls it at every mode switch)."""
        if self._folded is not None:
            self._folded.invalidate()

    def invalidated(self) -> bool:
        """Whether its folded form folds again at the next use (see `FoldedConvHead`)."""
        return self._folded is not None and self._folded.invalidated()

    def refresh(self) -> None:
        """Fold again now where a source changed (see `FoldedConvHead.refresh`)."""
        if self._folded is not None:
            self._folded.refresh()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.head
        if (
            not head.training
            and not torch.is_grad_enabled()
            and type(x) is torch.Tensor
            and x.ndim == 4
            and _plain(head)
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            folded = self.folded_form()
            if folded.applies():
                out = folded(x)
                if out is not None:
                    return out
        return head(x)


def inference_heads(heads: Iterable[nn.Module]) -> list[nn.Module]:
    """The heads as early-exit inference runs them: each channels-first `conv` head wrapped
    in an `InferenceHead`, the others as they are."""
    return [
        # getattr: a head unpickled from an earlier version has no `_fold_cell`.
        InferenceHead(h) if getattr(h, "_fold_cell", None) is not None else h
        for h in heads
    ]
