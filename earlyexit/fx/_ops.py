"""What a node of a traced graph does, judged from its op and target alone."""

from __future__ import annotations

from torch import fx, nn

__all__ = ["has_effect", "is_random", "is_size_source"]

# Reading these from a feature gives a value that a later stage can rebuild from its own input.
_SIZE_ATTRS = frozenset({"shape", "ndim", "device", "dtype"})
_SIZE_METHODS = frozenset({"size", "dim", "ndimension", "numel"})
_RANDOM = frozenset(
    {
        "rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like",
        "bernoulli", "bernoulli_", "normal", "normal_", "uniform_", "exponential_",
        "geometric_", "cauchy_", "log_normal_", "random_", "multinomial", "poisson",
        "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout",
        "feature_alpha_dropout", "native_dropout",
    }
)  # fmt: skip
# `x += y` and `x[i] = y` trace to these; they change their first argument.
_INPLACE_OPERATORS = frozenset(
    {
        "iadd", "isub", "imul", "imatmul", "itruediv", "ifloordiv", "imod", "ipow",
        "iand", "ior", "ixor", "ilshift", "irshift", "setitem", "delitem",
    }
)  # fmt: skip


def is_size_source(node: fx.Node) -> bool:
    """`x.shape`, `x.size(1)`, `x.ndim`, `x.device`, ...: metadata of a tensor, not its data."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SIZE_ATTRS
    return node.op == "call_method" and node.target in _SIZE_METHODS


def has_effect(node: fx.Node) -> bool:
    """Whether a call may do something besides returning a value (an assert, an in-place op)."""
    if node.target in fx.node._side_effectful_functions:
        return True
    if node.kwargs.get("inplace") is True:
        return True  # `F.relu(t, inplace=True)`
    name = getattr(node.target, "__name__", str(node.target))
    return (
        "assert" in name
        or name in _INPLACE_OPERATORS
        or (name.endswith("_") and not name.endswith("__"))
    )


def is_random(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether a node draws random numbers (dropout, `torch.rand`): its value can't be rebuilt."""
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.dropout._DropoutNd)
    return getattr(node.target, "__name__", str(node.target)) in _RANDOM
