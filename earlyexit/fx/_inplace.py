"""Eval-mode stages that reuse their own temporaries, for inference without autograd.

A traced graph gives every op a fresh output tensor, even where the model's own code (or an
equally valid version of it) could write into a temporary that nothing reads again: `relu` on
a convolution's output, `out + shortcut` at the end of a residual block. On CPU every large
allocation costs more than its bytes: with glibc's default malloc, freed activations go back
to the OS once enough of them lie together at the top of the heap, and the next allocation
page-faults them in afresh. A staged ResNet-110 at batch 256 took three times the original
module's page faults and 40 % more time for this reason alone.

`rewrite_inplace` returns a copy of a stage in which such ops write into their operand. Each
rewritten op checks, when it runs, that autograd is off and that the in-place result has the
out-of-place result's shape and dtype; otherwise it computes out of place. Either way the
values are the same, bit for bit (`a + b == b + a` in floating point, so a sum may be written
into either operand).

An operand may be overwritten only where the stage owns it: it was made inside the stage by an
op known to return a new tensor (a convolution, a norm, arithmetic, ...), possibly passed
through ops that return their input (an in-place activation, `Identity`, eval-mode dropout),
and everything else that reads it has run already and made a new tensor of its own. The
stage's parameters, buffers, views and anything of unknown provenance are never written, nor
is its input, unless the caller hands it over (`owns_input`): `rewrite_chain` does so for
stages that run one after another, each on a tensor the one before made, so that the sum
that ends the first residual block of a stage is written into its shortcut, the stage's
input, as it is where the same block runs inside one stage.

Both also let the temporaries that only convolutions read share a per-call workspace
(`earlyexit.fx._workspace`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from earlyexit.fx._fold import FoldedConvBN, copy_stage, free_name
from earlyexit.fx._pointwise import FusedConv
from earlyexit.fx._workspace import assign_workspaces

__all__ = ["rewrite_chain", "rewrite_inplace"]

# Modules whose output is a new tensor, never their input or a view of it.
_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    FoldedConvBN,
    FusedConv,
    nn.Linear,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.GELU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softmax,
)
# Modules that return their input itself in eval mode (or a new tensor: either is safe).
_PASS_THROUGH_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.modules.dropout._DropoutNd)
_FRESH_FUNCTIONS = frozenset(
    {
        operator.add, operator.sub, operator.mul, operator.truediv, operator.matmul,
        operator.neg, torch.add, torch.sub, torch.mul, torch.div, torch.matmul, torch.cat,
        torch.relu, torch.sigmoid, torch.tanh, torch.softmax,
        F.conv1d, F.conv2d, F.conv3d, F.linear, F.batch_norm, F.layer_norm, F.group_norm,
        F.gelu, F.sigmoid, F.softmax, F.avg_pool2d, F.adaptive_avg_pool2d,
        F.scaled_dot_product_attention,
    }
)  # fmt: skip
_FRESH_METHODS = frozenset(
    {"add", "sub", "mul", "div", "matmul", "relu", "sigmoid", "tanh", "softmax", "mean", "sum"}
)
# Out-of-place ops that may write their result into an operand, and the one they become.
_ADD = frozenset({operator.add, torch.add, "add"})
_MUL = frozenset({operator.mul, torch.mul, "mul"})
_RELU = frozenset({F.relu, torch.relu, "relu"})


def _can_overwrite(t: object, other: object = None) -> bool:
    """Whether writing `t op other` into `t` gives the out-of-place result, autograd off."""
    if not isinstance(t, torch.Tensor) or torch.is_grad_enabled():
        return False
    if other is None:  # a unary op
        return True
    if isinstance(other, torch.Tensor):
        if other.shape == t.shape and other.dtype == t.dtype:  # the common case, checked fast
            return True
        shape = torch.broadcast_shapes(t.shape, other.shape)
        return t.shape == shape and t.dtype == torch.result_type(t, other)
    return isinstance(other, (int, float)) and t.dtype == torch.result_type(t, other)


def add_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a + b`, written into `a` where `_can_overwrite` allows."""
    return a.add_(b) if _can_overwrite(a, b) else a + b


def mul_(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a * b`, written into `a` where `_can_overwrite` allows."""
    return a.mul_(b) if _can_overwrite(a, b) else a * b


def relu_(x: torch.Tensor) -> torch.Tensor:
    """`relu(x)`, written into `x` with autograd off."""
    return torch.relu_(x) if _can_overwrite(x) else torch.relu(x)


def silu_(x: torch.Tensor) -> torch.Tensor:
    """`silu(x)`, written into `x` with autograd off."""
    return F.silu(x, inplace=_can_overwrite(x))


def hardswish_(x: torch.Tensor) -> torch.Tensor:
    """`hardswish(x)`, written into `x` with autograd off."""
    return F.hardswish(x, inplace=_can_overwrite(x))


def hardtanh_(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """`hardtanh(x, low, high)` (ReLU6 is one), written into `x` with autograd off."""
    return F.hardtanh(x, low, high, inplace=_can_overwrite(x))


def leaky_relu_(x: torch.Tensor, slope: float) -> torch.Tensor:
    """`leaky_relu(x, slope)`, written into `x` with autograd off."""
    return F.leaky_relu(x, slope, inplace=_can_overwrite(x))


def _activation(module: nn.Module) -> tuple[Callable[..., torch.Tensor], tuple] | None:
    """The in-place function and its extra arguments for an out-of-place activation module."""
    if getattr(module, "inplace", False) is True:
        return None  # it writes into its input already
    kind = type(module)
    if kind is nn.ReLU:
        return relu_, ()
    if kind is nn.SiLU:
        return silu_, ()
    if kind is nn.Hardswish:
        return hardswish_, ()
    if kind in (nn.ReLU6, nn.Hardtanh):
        return hardtanh_, (float(module.min_val), float(module.max_val))
    if kind is nn.LeakyReLU:
        return leaky_relu_, (float(module.negative_slope),)
    return None


class _Rewriter:
    """Walks a stage's graph once, in execution order, rewriting what it may."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.order = {n: i for i, n in enumerate(gm.graph.nodes)}
        # A node whose output is its first argument's tensor (or a new one): the chain a
        # buffer passes along.
        self.passes: set[fx.Node] = set()
        self.fresh: set[fx.Node] = set()

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def classify(self, node: fx.Node) -> None:
        """Note whether a (not rewritten) node makes a new tensor or passes its input on."""
        module = self.module(node)
        if module is not None:
            if getattr(module, "inplace", False) is True or isinstance(
                module, _PASS_THROUGH_MODULES
            ):
                self.passes.add(node)
            elif isinstance(module, _FRESH_MODULES) or _activation(module) is not None:
                self.fresh.add(node)
        elif node.op == "call_function" and node.target in _FRESH_FUNCTIONS:
            if node.kwargs.get("inplace") is True or "out" in node.kwargs:
                return
            self.fresh.add(node)
        elif node.op == "call_method" and node.target in _FRESH_METHODS:
            self.fresh.add(node)

    def owned(self, t: object, at: fx.Node) -> bool:
        """Whether node `at` may overwrite the tensor of node `t`."""
        if not isinstance(t, fx.Node):
            return False
        chain = [t]
        while chain[-1] in self.passes:
            source = chain[-1].args[0] if chain[-1].args else None
            if not isinstance(source, fx.Node):
                return False
            chain.append(source)
        if chain[-1] not in self.fresh:
            return False
        for k, version in enumerate(chain):
            successor = at if k == 0 else chain[k - 1]
            for user in version.users:
                if user is successor:
                    continue
                # Another reader: it must have run already and made a tensor of its own.
                if user not in self.fresh or self.order[user] > self.order[at]:
                    return False
        return True

    def rewrite_fused(self, node: fx.Node) -> bool:
        """Have a fused convolution + sum write into its second input where the stage owns
        it (and it is not also the convolution's input); whether it did."""
        module = self.module(node)
        if not isinstance(module, FusedConv) or not module.add or module.into_other:
            return False
        if len(node.args) != 2 or node.kwargs or node.args[0] is node.args[1]:
            return False
        if not self.owned(node.args[1], node):
            return False
        name = free_name(self.gm, f"{node.target}_into".replace(".", "_"))
        self.gm.add_submodule(name, module.writing_into_other())
        node.target = name
        return True

    def rewrite(self, node: fx.Node) -> bool:
        """Rewrite `node` to work in place where it owns an operand; whether it did."""
        module = self.module(node)
        target = node.target if node.op != "call_module" else None
        if node.op in ("call_function", "call_method") and not node.kwargs and len(node.args) == 2:
            fn = add_ if target in _ADD else mul_ if target in _MUL else None
            a, b = node.args
            first = fn is not None and self.owned(a, node)
            if first or (fn is not None and self.owned(b, node)):
                node.op, node.target = "call_function", fn
                node.args = (a, b) if first else (b, a)
                return True
        unary = len(node.args) == 1 and not node.kwargs
        relu = node.op in ("call_function", "call_method") and target in _RELU and unary
        if relu and self.owned(node.args[0], node):
            node.op, node.target = "call_function", relu_
            return True
        if module is not None and len(node.args) == 1 and not node.kwargs:
            found = _activation(module)
            if found is not None and self.owned(node.args[0], node):
                fn, extra = found
                node.op, node.target, node.args = "call_function", fn, (node.args[0], *extra)
                return True
        return False

    def run(self) -> int:
        """Rewrite the graph; the number of ops rewritten."""
        count = 0
        for node in list(self.gm.graph.nodes):
            if self.rewrite_fused(node):
                # Its output is its second input's tensor or a new one: either way the
                # stage's own, and nothing else reads that input again.
                self.fresh.add(node)
                count += 1
            elif self.rewrite(node):
                self.passes.add(node)
                count += 1
            else:
                self.classify(node)
        return count

    def returns_own(self) -> bool:
        """Whether the stage returns a tensor of its own: one it made, or its input where it
        owns that, possibly passed on by ops that return their input (after `run`)."""
        output = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        node = output.args[0] if output.args else None
        while isinstance(node, fx.Node) and node in self.passes:
            node = node.args[0] if node.args else None
        return isinstance(node, fx.Node) and node in self.fresh


def rewrite_inplace(stage: fx.GraphModule, *, owns_input: bool = False) -> fx.GraphModule:
    """A copy of an eval-mode stage whose ops write into temporaries it owns, autograd off.

    The copy shares the stage's modules, parameters and buffers; only its graph differs. With
    autograd on, every rewritten op computes out of place, as the original does. Fused
    ReLU-only convolutions whose output only other convolutions read write into a workspace
    made per call (`earlyexit.fx._workspace.assign_workspaces`).

    Args:
        stage: an eval-mode stage.
        owns_input: whether the caller hands the stage its input: it reads it no more once
            the stage has run, and nothing else holds it. The stage may then write into its
            input as into a temporary of its own.

    Returns:
        The rewritten stage (a new `GraphModule`, also when nothing could be rewritten).
    """
    return _rewrite(stage, owns_input)[0]


def rewrite_chain(stages: Sequence[fx.GraphModule]) -> list[fx.GraphModule]:
    """`rewrite_inplace` for eval-mode stages that run one after another, each on the output
    of the one before (or on a copy of some of its rows), which the caller reads no more once
    the stage has run.

    From the second stage on, a stage owns its input wherever the stage before returns a
    tensor of its own (see `rewrite_inplace`'s `owns_input`); the first stage never does,
    and neither does one after a stage that may return its input, a view, a parameter or
    anything else it did not make.
    """
    chain, owned = [], False
    for stage in stages:
        gm, owned = _rewrite(stage, owned)
        chain.append(gm)
    return chain


def _rewrite(stage: fx.GraphModule, owns_input: bool) -> tuple[fx.GraphModule, bool]:
    """The rewritten copy, and whether it returns a tensor of its own."""
    gm = copy_stage(stage)
    rewriter = _Rewriter(gm)
    if owns_input:
        rewriter.fresh.update(n for n in gm.graph.nodes if n.op == "placeholder")
    rewritten = rewriter.run()
    returns_own = rewriter.returns_own()
    if rewritten + assign_workspaces(gm):
        gm.recompile()
    return gm, returns_own
