"""Eval-mode stages whose convolutions apply the ReLU and the residual sum after them, on CPU.

After batch-norm folding, a CIFAR ResNet's block is a convolution, a ReLU, a convolution, a
sum with the shortcut and a ReLU, and each convolution makes a fresh activation: two per
block. At batch 256 and 32×32 with 16 channels each is 16 MiB, and with glibc's default
malloc a fresh block of that size is often handed back to the system and page-faulted in
again. oneDNN, the library behind PyTorch's CPU convolutions, can apply the ReLU and the
sum to each output tile while it is in the cache ("post-ops"), and can write the result into
the shortcut itself; PyTorch exposes both as `torch.ops.mkldnn._convolution_pointwise` (and
`_convolution_pointwise_`, in place), the ops `torch.compile` uses for the same fusion on
CPU. A block then makes one fresh activation instead of two.

`fuse_pointwise` returns a copy of a stage in which each ungrouped 2-d convolution (or
folded convolution → batch norm pair, see `earlyexit.fx._fold`) whose output is read only by
a ReLU (also through `nn.Identity` calls), by a sum (`+`, not `add_`), or by a sum read
only by a ReLU, with nothing in between that may write into a tensor, runs as one
`FusedConv`; `earlyexit.fx._inplace`
then lets a fused sum write into its shortcut where the stage owns it and nothing reads it
again (`FusedConv.into_other`). When it runs, a `FusedConv` checks that the fused op applies:
autograd off, no autocast, a float32 4-d input on the CPU, oneDNN present and enabled, no
hooks on the modules involved, an output of at least `MIN_FUSED_ELEMENTS` elements, a
shortcut of the output's shape (and, to write into it, of the output's memory layout and not
the input's memory). Otherwise it computes the ops one by one. The fused op gives the same
values as the separate ops, bit for bit in every case the tests check and on ResNet-110 at
batches of 4 to 256 (it adds and clamps the same float32 sums), in the same memory layout;
at batch 1, where it no longer runs, oneDNN's fused kernel rounded differently (about 1e-7
relative). One difference: oneDNN's ReLU turns a NaN into 0, where `torch.relu` keeps it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from earlyexit.fx._fold import (
    _GLOBAL_HOOKS,
    _GLOBAL_PRE_HOOKS,
    FoldedConvBN,
    copy_stage,
    free_name,
)
from earlyexit.fx._ops import has_effect

__all__ = ["FusedConv", "fuse_pointwise", "fused_convolutions", "fused_op_available"]

#: The smallest output, in elements, that the fused op runs for (4 MiB of float32). Smaller
#: activations come back from the allocator's free lists without page faults, and there the
#: fused op measured no faster than the ops one by one (at batch 1, slower).
MIN_FUSED_ELEMENTS = 1 << 20

# Sums whose result is a new tensor (not `add_` or `+=` on a tensor: they keep its dtype).
_ADD = frozenset({operator.add, torch.add, "add"})
_RELU_FUNCTIONS = frozenset({F.relu, torch.relu, torch.relu_})
_RELU_METHODS = frozenset({"relu", "relu_"})


# Whether this build has the ops at all: it cannot change while the process runs.
_OPS_BUILT = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")
)


def fused_op_available() -> bool:
    """Whether this PyTorch build has oneDNN's fused convolution ops (and oneDNN is on)."""
    return _OPS_BUILT and torch.backends.mkldnn.enabled


def _hooked(module: nn.Module) -> bool:
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or _GLOBAL_PRE_HOOKS
        or _GLOBAL_HOOKS
        or "forward" in module.__dict__
    )


class FusedConv(nn.Module):
    """A 2-d convolution, then optionally a sum with a second input, then optionally a ReLU.

    On the CPU with autograd off it runs as one oneDNN convolution with the sum and the ReLU
    as post-ops; otherwise as the separate ops. It holds the modules themselves (shared, not
    copied).

    Args:
        conv: an `nn.Conv2d` or a `FoldedConvBN` around one.
        add: whether the convolution's output is summed with `forward`'s second input.
        relu: whether a ReLU follows; `relu_module` is the `nn.ReLU` module it was, if any
            (its hooks are honoured).
        between: `nn.Identity` modules that stood between the convolution and the ReLU (timm's
            ResNets keep `drop_block` and `aa` there); they run, hooks and all, where the ops
            run as written.
        into_other: write the result into the second input, where the fused op runs and the
            second input has the output's shape and memory layout and shares no memory with
            the first (`earlyexit.fx._inplace` sets it where the stage owns that input and
            nothing reads it again). A residual block then allocates one activation instead
            of two: on CPU, fewer fresh pages to fault in.
        slot: a ReLU-only convolution writes its output into this slot of a `Workspace`,
            `forward`'s second input, where the fused op runs (`earlyexit.fx._workspace` sets
            it where only other convolutions read the output, and they have run before the
            slot is written again). The stage's temporaries then reuse one block of memory
            instead of a fresh one each.
    """

    def __init__(
        self,
        conv: nn.Module,
        *,
        add: bool,
        relu: bool,
        relu_module: nn.Module | None = None,
        into_other: bool = False,
        slot: int | None = None,
        between: Sequence[nn.Module] = (),
    ) -> None:
        super().__init__()
        if not (add or relu):
            raise ValueError("Expected a sum, a ReLU or both after the convolution.")
        if into_other and not add:
            raise ValueError("Expected a sum to write into its second input (`into_other`).")
        if slot is not None and (add or isinstance(slot, bool) or not isinstance(slot, int)):
            raise ValueError("Expected a workspace `slot` (an int) on a ReLU-only convolution.")
        self.conv = conv
        self.add = bool(add)
        self.relu = bool(relu)
        self.relu_module = relu_module
        self.into_other = bool(into_other)
        self.slot = slot
        self.between = nn.ModuleList(between)

    def writing_into_other(self) -> FusedConv:
        """The same ops, writing into the second input where they can (`into_other`)."""
        return FusedConv(
            self.conv,
            add=True,
            relu=self.relu,
            relu_module=self.relu_module,
            into_other=True,
            between=self.between,
        )

    def writing_into_workspace(self, slot: int) -> FusedConv:
        """The same ops, writing into slot `slot` of the `Workspace` given as second input."""
        return FusedConv(
            self.conv,
            add=False,
            relu=True,
            relu_module=self.relu_module,
            slot=slot,
            between=self.between,
        )

    def _conv2d(self) -> nn.Conv2d:
        return self.conv.conv if isinstance(self.conv, FoldedConvBN) else self.conv

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The weight and bias the fused op would use now, or None where it must not run."""
        conv = self.conv
        if isinstance(conv, FoldedConvBN):
            if conv.bn.training:
                return None
            key = conv.source_key()
            return None if key is None else conv.folded(key)
        return conv.weight, conv.bias

    def _plain(self) -> bool:
        """Whether the ops may run as inference ops: autograd off, no hooks on any module."""
        if torch.is_grad_enabled():
            return False
        modules = [self.conv, self._conv2d()]
        if isinstance(self.conv, FoldedConvBN):
            modules.append(self.conv.bn)
        if self.relu_module is not None:
            modules.append(self.relu_module)
        return not any(_hooked(m) for m in (*modules, *self.between))

    def _fusable(self, x: torch.Tensor, other: torch.Tensor | None) -> bool:
        """Whether the fused op applies to these inputs (autograd already known to be off)."""
        if (
            torch.is_autocast_enabled("cpu")
            or x.device.type != "cpu"
            or x.dtype != torch.float32
            or x.dim() != 4
            or x.layout != torch.strided
            or not fused_op_available()
            or type(self._conv2d()) is not nn.Conv2d
        ):
            return False
        shape = _output_shape(self._conv2d(), x)
        if math.prod(shape) < MIN_FUSED_ELEMENTS:
            return False
        if other is None:
            return True
        if (
            not isinstance(other, torch.Tensor)
            or other.dtype != torch.float32
            or other.device.type != "cpu"
            or other.layout != torch.strided
        ):
            return False
        return tuple(other.shape) == shape

    def forward(self, x: torch.Tensor, other: object = None) -> torch.Tensor:
        workspace = None
        if self.slot is not None:  # the second input is the stage's workspace, not a sum
            workspace, other = other, None
        if not self._plain():
            return self._as_written(x, other)
        weights = self._weights() if self._fusable(x, other) else None
        if weights is None or any(t is not None and t.dtype != torch.float32 for t in weights):
            return self._separate(x, other)
        weight, bias = weights
        conv = self._conv2d()
        geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        if not self.add:
            out = self._slot_buffer(workspace, x, weight)
            if out is not None:
                # oneDNN's in-place op adds into its output: zeroed, that is the output itself.
                return torch.ops.mkldnn._convolution_pointwise_.binary(
                    out.zero_(), x, weight, bias, *geometry, "add", None, "relu", [], None
                )
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, *geometry, "relu", [], ""
            )
        unary = "relu" if self.relu else None
        if self.into_other and _writable(other, x, weight):
            return torch.ops.mkldnn._convolution_pointwise_.binary(
                other, x, weight, bias, *geometry, "add", None, unary, [], None
            )
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, other, weight, bias, *geometry, "add", None, unary, [], None
        )

    def _slot_buffer(
        self, workspace: object, x: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor | None:
        """The workspace's buffer for this output, or None where there is none to write."""
        if self.slot is None or not hasattr(workspace, "take"):
            return None
        channels_last = _output_channels_last(x, weight)
        if channels_last is None:
            return None
        shape = _output_shape(self._conv2d(), x)
        out = workspace.take(self.slot, shape, channels_last)  # the output's own strides
        return None if _same_storage(out, x) else out

    def _separate(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """The ops one by one, autograd off: the sum and the ReLU write into the new output."""
        y = self.conv(x)
        if self.add:
            same = isinstance(other, torch.Tensor) and _sums_into(y, other)
            y = y.add_(other) if same else y + other
        return torch.relu_(y) if self.relu else y

    def _as_written(self, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        """The ops as the stage was written: for autograd and for hooks."""
        y = self.conv(x)
        for module in self.between:
            y = module(y)
        if self.add:
            y = y + other
        if not self.relu:
            return y
        return torch.relu(y) if self.relu_module is None else self.relu_module(y)


def _writable(other: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the convolution of `x` may be written into `other`: `other` has exactly the
    strides the convolution's own output would have, and shares no memory with `x`."""
    if _same_storage(other, x):
        return False
    channels_last = _output_channels_last(x, weight)
    if channels_last is None:
        return False
    _, c, h, w = other.shape
    strides = (h * w * c, 1, w * c, c) if channels_last else (c * h * w, h * w, w, 1)
    return other.stride() == strides


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _output_channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool | None:
    """Whether the convolution of `x` by `weight` comes out channels-last (PyTorch's rule:
    either input makes it so); None where strides fit both layouts and it is not clear."""
    x_layout, w_layout = _layout(x), _layout(weight)
    if "channels_last" in (x_layout, w_layout):
        return True
    if x_layout == w_layout == "contiguous":
        return False
    return None


def _layout(t: torch.Tensor) -> str | None:
    """ "contiguous" or "channels_last" for a 4-d tensor dense in one of them only, else None."""
    contiguous = t.is_contiguous()
    channels_last = t.is_contiguous(memory_format=torch.channels_last)
    if contiguous != channels_last:
        return "contiguous" if contiguous else "channels_last"
    return None


def _sums_into(y: torch.Tensor, other: torch.Tensor) -> bool:
    """Whether `y.add_(other)` gives `y + other`: same shape after broadcasting, same dtype."""
    if other.shape == y.shape and other.dtype == y.dtype:
        return True
    shape = torch.broadcast_shapes(y.shape, other.shape)
    return y.shape == shape and y.dtype == torch.result_type(y, other)


def _output_shape(conv: nn.Conv2d, x: torch.Tensor) -> tuple[int, ...]:
    n, _, *spatial = x.shape
    size = [
        (s + 2 * p - d * (k - 1) - 1) // st + 1
        for s, p, d, k, st in zip(
            spatial, conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True
        )
    ]
    return (n, conv.out_channels, *size)


def _fusable_conv(module: nn.Module | None) -> bool:
    """A plain, ungrouped `Conv2d` with explicit zero padding, folded with its norm or not."""
    if isinstance(module, FoldedConvBN):
        module = module.conv
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and module.groups == 1  # grouped ones rounded differently when written in place
    )


class _Fuser:
    """Walks a stage's graph once, replacing each fusable pattern with a `FusedConv`."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm

    def module(self, node: object) -> nn.Module | None:
        if isinstance(node, fx.Node) and node.op == "call_module":
            return self.gm.get_submodule(str(node.target))
        return None

    def conv_node(self, node: object) -> bool:
        """A convolution call whose only reader is the op after it."""
        return (
            isinstance(node, fx.Node)
            and len(node.args) == 1
            and not node.kwargs
            and len(node.users) == 1
            and _fusable_conv(self.module(node))
        )

    def identity(self, node: object) -> bool:
        """An `nn.Identity` call whose only reader is the op after it."""
        return (
            isinstance(node, fx.Node)
            and type(self.module(node)) is nn.Identity
            and len(node.args) == 1
            and not node.kwargs
            and len(node.users) == 1
        )

    def relu(self, node: fx.Node) -> tuple[bool, nn.Module | None]:
        """Whether `node` is a ReLU of its one argument, and the `nn.ReLU` module if it is one."""
        if len(node.args) != 1:
            return False, None
        module = self.module(node)
        if module is not None:
            is_relu = type(module) is nn.ReLU and not node.kwargs
            return is_relu, module if is_relu else None
        if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
            return set(node.kwargs) <= {"inplace"}, None
        return node.op == "call_method" and node.target in _RELU_METHODS and not node.kwargs, None

    def add_operands(self, node: fx.Node) -> tuple[fx.Node, object] | None:
        """The convolution and the other operand of a plain sum `node`, if it is one."""
        if node.op not in ("call_function", "call_method") or node.kwargs or len(node.args) != 2:
            return None
        a, b = node.args
        if node.target not in _ADD or a is b:  # `conv(x) + conv(x)` of one node: not a shortcut
            return None
        for conv, other in ((a, b), (b, a)):
            if self.conv_node(conv) and isinstance(other, fx.Node):
                return conv, other
        return None

    def may_write(self, node: fx.Node) -> bool:
        """Whether a node may change a tensor it reads (an in-place op, an unknown module)."""
        module = self.module(node)
        if module is not None:
            known = type(module).__module__.startswith("torch.nn.") or isinstance(
                module, (FoldedConvBN, FusedConv)
            )
            return getattr(module, "inplace", False) is True or not known
        return node.op in ("call_function", "call_method") and has_effect(node)

    def undisturbed(self, first: fx.Node, last: fx.Node) -> bool:
        """Whether nothing between two nodes may write: the fused node runs where `last` was,
        so the convolution's input and the shortcut must be unchanged until then."""
        node = first.next
        while node is not last:
            if self.may_write(node):
                return False
            node = node.next
        return True

    def replace(self, last: fx.Node, conv: fx.Node, fused: FusedConv, args: tuple) -> None:
        name = free_name(self.gm, f"{conv.target}_fused".replace(".", "_"))
        self.gm.add_submodule(name, fused)
        with self.gm.graph.inserting_before(last):
            new = self.gm.graph.call_module(name, args)
        last.replace_all_uses_with(new)
        new.meta.update(last.meta)

    def run(self) -> int:
        count = 0
        graph = self.gm.graph
        erased: set[fx.Node] = set()
        for node in list(graph.nodes):
            if node in erased or node.op not in ("call_module", "call_function", "call_method"):
                continue
            is_relu, relu_module = self.relu(node)
            source = node.args[0] if is_relu else None
            between = []  # Identity calls between the convolution and the ReLU, last first
            while is_relu and self.identity(source):
                between.append(source)
                source = source.args[0]
            if is_relu and self.conv_node(source) and self.undisturbed(source, node):
                conv = self.module(source)
                passed = [self.module(n) for n in reversed(between)]
                fused = FusedConv(
                    conv, add=False, relu=True, relu_module=relu_module, between=passed
                )
                self.replace(node, source, fused, (source.args[0],))
                for done in (node, *between, source):
                    graph.erase_node(done)
                count += 1
                continue
            operands = None if is_relu else self.add_operands(node)
            if operands is None:
                continue
            conv_node, other = operands
            after = next(iter(node.users)) if len(node.users) == 1 else None
            relu_after, relu_module = self.relu(after) if after is not None else (False, None)
            last = after if relu_after else node
            if not self.undisturbed(conv_node, last):
                continue
            fused = FusedConv(
                self.module(conv_node), add=True, relu=relu_after, relu_module=relu_module
            )
            self.replace(last, conv_node, fused, (conv_node.args[0], other))
            if relu_after:
                graph.erase_node(after)
                erased.add(after)
            graph.erase_node(node)
            graph.erase_node(conv_node)
            count += 1
        return count


def fused_convolutions(stages: list[fx.GraphModule]) -> list[FusedConv]:
    """The `FusedConv` modules the stages' graphs call, in order."""
    called = [s.get_submodule(n.target) for s in stages for n in s.graph.nodes
              if n.op == "call_module"]  # fmt: skip
    return [m for m in called if isinstance(m, FusedConv)]


def fuse_pointwise(stage: fx.GraphModule) -> fx.GraphModule:
    """A copy of an eval-mode stage whose convolutions apply the ReLU and sum after them.

    The copy shares the stage's modules, parameters and buffers; only its graph differs (and
    the `FusedConv` modules it adds). Where the fused op does not apply when it runs (see the
    module docstring), each `FusedConv` computes as the stage is written.

    Args:
        stage: an eval-mode stage (batch norms folded or not).

    Returns:
        The rewritten stage (a new `GraphModule`, also when nothing could be fused).
    """
    gm = copy_stage(stage)
    if _Fuser(gm).run():
        gm.graph.lint()
        gm.recompile()
    return gm
