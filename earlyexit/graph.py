"""Tracing a model with torch.fx, finding its cut points, and splitting it into stages.

A *cut point* is a node of the traced graph after which the node's own output is the only value
that later nodes still need; values that do not depend on the input (parameters, buffers,
constants and whatever is computed from them alone) don't count, since any stage can rebuild
them. Neither do sizes read from a feature (`B, C, H, W = x.shape`) nor values computed from
sizes alone (`cls_token.expand(B, -1, -1)`, a position embedding for the token grid): a later
stage that needs one recomputes it, with the batch size of its own input, since early-exit
inference hands later stages fewer samples. Splitting the graph at cut points gives stages with
one input and one output each, which share the original model's parameters.

A model whose forward returns a tuple (auxiliary logits in train mode, GoogLeNet's namedtuple)
is traced as returning its first element, and what only fed the rest is pruned.

Nodes are named by their dotted qualified path (`layer1.0`, `stages.2.blocks.0.add`), never by
raw FX names: the outermost module whose output a node is gives it its name, otherwise the
innermost module it was computed in plus the operation (`layer1.0.add`, `layer1.0.add_1`).
"""

from __future__ import annotations

import inspect
import re
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from earlyexit.errors import TraceError

__all__ = [
    "CutPoint",
    "TracedModel",
    "split_stages",
    "trace_model",
]


@dataclass(frozen=True)
class CutPoint:
    """A node where the traced graph can be split and an exit can see a feature tensor.

    Attributes:
        name: dotted qualified name of the node.
        shape: the feature's shape for one sample, without the batch axis.
        channel_axis: the axis of the full `(B, ...)` feature that holds the channels.
    """

    name: str
    shape: tuple[int, ...]
    channel_axis: int


@dataclass
class TracedModel:
    """A model traced in eval and train mode, with its candidate cut points (eval graph).

    Attributes:
        eval_graph: the graph traced with the model in eval mode.
        train_graph: the graph traced with the model in train mode.
        cut_points: every cut point whose output is a feature tensor, in execution order.
        input_size: the `(C, H, W)` the graph was shape-propagated with.
        num_classes: the size of the model's output.
    """

    eval_graph: fx.GraphModule
    train_graph: fx.GraphModule
    cut_points: list[CutPoint]
    input_size: tuple[int, ...]
    num_classes: int


class _PathTracer(fx.Tracer):
    """A tracer that knows timm's untraceable modules and functions and names nodes by path."""

    def __init__(self) -> None:
        from timm.layers import _fx as timm_fx

        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self._timm_leaves = tuple(timm_fx.get_notrace_modules())
        self._path = ""
        self.node_scope: dict[fx.Node, str] = {}
        self.module_output: dict[fx.Node, str] = {}
        self.module_outputs: dict[fx.Node, set[str]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        outer = self._path
        self._path = self.path_of_module(m)
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._path = outer
        if isinstance(out, fx.Proxy) and self.path_of_module(m):
            # The outermost module wins: its call returns last.
            self.module_output[out.node] = self.path_of_module(m)
            self.module_outputs.setdefault(out.node, set()).add(self.path_of_module(m))
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.node_scope[node] = self._path
        return node


def _qualified_names(graph: fx.Graph, tracer: _PathTracer) -> dict[fx.Node, str]:
    names: dict[fx.Node, str] = {}
    used: dict[str, int] = {}
    for node in graph.nodes:
        if node in tracer.module_output:
            name = tracer.module_output[node]
        elif node.op == "call_module":
            name = str(node.target)
        elif node.op in ("placeholder", "output"):
            name = node.name
        else:
            base = re.sub(r"_\d+$", "", node.name)
            scope = tracer.node_scope.get(node, "")
            name = f"{scope}.{base}" if scope else base
        if name in used:
            used[name] += 1
            name = f"{name}_{used[name]}"
        else:
            used[name] = 0
        names[node] = name
    return names


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Put every submodule in one mode, then restore each module's own flag."""
    flags = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        yield
    finally:
        for m, flag in flags.items():
            m.training = flag


def _extra_arguments(model: nn.Module) -> dict[str, Any]:
    """Specialise every forward argument after the first to its default value."""
    params = list(inspect.signature(model.forward).parameters.values())
    concrete: dict[str, Any] = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TraceError(
                f"{type(model).__name__}.forward takes a required argument `{p.name}` besides "
                "the input. Hint: wrap the model in a module whose forward takes only the image."
            )
        concrete[p.name] = p.default
    return concrete


def _drop_specialised_placeholders(graph: fx.Graph, model_name: str) -> None:
    """Remove the placeholders of specialised arguments and the asserts that check them."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    closure: set[fx.Node] = set()
    for node in graph.nodes:
        if node in placeholders[1:] or any(a in closure for a in node.all_input_nodes):
            closure.add(node)
    for node in reversed(list(graph.nodes)):
        if node not in closure:
            continue
        if any(user not in closure for user in node.users):
            raise TraceError(
                f"{model_name}: the forward argument `{node.name}` changes the computation. "
                "Hint: wrap the model so that its forward takes only the image."
            )
        graph.erase_node(node)


def _keep_first_output(graph: fx.Graph) -> bool:
    """Make a graph that returns a tuple (e.g. logits and auxiliary logits) return the logits.

    Returns:
        Whether the graph changed.
    """
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = first = output.args[0]
    while True:
        if isinstance(first, (tuple, list)) and first:
            first = first[0]
        elif (
            isinstance(first, fx.Node)
            and first.op == "call_function"
            and isinstance(first.target, type)
            and issubclass(first.target, tuple)
            and (first.args or first.kwargs)
        ):
            # A namedtuple built in the graph, e.g. torchvision's `GoogLeNetOutputs`.
            fields = getattr(first.target, "_fields", ())
            first = first.args[0] if first.args else first.kwargs.get(fields[0] if fields else "")
        else:
            break
    if first is value:
        return False
    output.args = (first,)
    return True


def _eliminate_dead_code(gm: fx.GraphModule) -> None:
    """Remove the nodes whose values are unused (the auxiliary heads, once the output is cut).

    Unlike `fx.Graph.eliminate_dead_code`, in-place calls stay: `t.div_(p)` is unused as a
    value but changes `t`.
    """
    for node in reversed(list(gm.graph.nodes)):
        if node.users or node.op in ("placeholder", "output", "get_attr"):
            continue
        if node.op == "call_module":
            if getattr(gm.get_submodule(str(node.target)), "inplace", False):
                continue
        elif _has_effect(node):
            continue
        gm.graph.erase_node(node)


def _trace_one(model: nn.Module, training: bool) -> tuple[fx.GraphModule, dict[str, fx.Node]]:
    name = type(model).__name__
    tracer = _PathTracer()
    with _mode(model, training):
        try:
            graph = tracer.trace(model, concrete_args=_extra_arguments(model) or None)
        except TraceError:
            raise
        except Exception as err:
            raise TraceError(
                f"torch.fx could not trace {name} ({type(err).__name__}: {err}). Hint: the "
                "model has data-dependent control flow; register the offending function or "
                "module as a leaf with `timm.layers.register_notrace_function` / "
                "`register_notrace_module`, or simplify its forward."
            ) from err
    _drop_specialised_placeholders(graph, name)
    gm = fx.GraphModule(tracer.root, graph, class_name=f"Traced{name}")
    if _keep_first_output(gm.graph):
        _eliminate_dead_code(gm)
        gm.recompile()
    gm.training = training
    names = _qualified_names(gm.graph, tracer)
    by_name = {q: n for n, q in names.items()}
    for node, q in names.items():
        node.meta["qualname"] = q
        node.meta["scope"] = tracer.node_scope.get(node, "")
        node.meta["module_outputs"] = frozenset(tracer.module_outputs.get(node, ()))
    return gm, by_name


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


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


def _is_size_source(node: fx.Node) -> bool:
    """`x.shape`, `x.size(1)`, `x.ndim`, `x.device`, ...: metadata of a tensor, not its data."""
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) == 2 and node.args[1] in _SIZE_ATTRS
    return node.op == "call_method" and node.target in _SIZE_METHODS


def _has_effect(node: fx.Node) -> bool:
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


def _is_random(node: fx.Node, gm: fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.modules.dropout._DropoutNd)
    return getattr(node.target, "__name__", str(node.target)) in _RANDOM


def _size_derived(gm: fx.GraphModule, dependent: set[fx.Node]) -> set[fx.Node]:
    """Input-dependent nodes that depend on the input only through sizes (shape arithmetic,
    `cls_token.expand(x.shape[0], -1, -1)`, position embeddings for the input's grid).

    A later stage recomputes them instead of receiving them, so they do not hide cut points;
    the batch size they use is then the later stage's own (which early-exit inference shrinks).
    """
    derived: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node not in dependent or node.op in ("placeholder", "output"):
            continue
        if _is_size_source(node):
            derived.add(node)
            continue
        inputs = [a for a in node.all_input_nodes if a in dependent]
        if inputs and all(a in derived for a in inputs) and not _is_random(node, gm):
            derived.add(node)
    return derived


def _cut_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Input-dependent nodes after which only their own output is still needed.

    Values computed from the input's size alone don't count: later stages rebuild them.
    """
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    dependent = _input_dependent(gm.graph)
    live_values = dependent - _size_derived(gm, dependent)
    live = [0] * (len(nodes) + 1)
    for node in live_values:
        # Reading a feature's size later does not keep the feature alive: it can be rebuilt.
        uses = [index[u] for u in node.users if not _is_size_source(u)]
        if not uses:
            continue
        live[index[node]] += 1
        live[max(uses)] -= 1
    cuts, count = [], 0
    for i, node in enumerate(nodes):
        count += live[i]
        if (
            count == 1
            and node in live_values
            and any(not _is_size_source(u) for u in node.users)
            and node.op not in ("placeholder", "output")
        ):
            cuts.append(node)
    return cuts


def _crossing_sources(gm: fx.GraphModule, cuts: list[fx.Node]) -> set[fx.Node]:
    """The size sources whose values some later stage needs when split at every cut point."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    dependent = _input_dependent(gm.graph)
    derived = _size_derived(gm, dependent)
    cut_index = sorted(index[c] for c in cuts)

    def crosses(start: int, end: int) -> bool:
        return any(start <= c < end for c in cut_index)

    crossing = [
        node
        for node in derived
        if any(crosses(index[node], index[u]) for u in node.users)
        or (_is_size_source(node) and crosses(index[node.args[0]], index[node]))
    ]
    sources: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    while crossing:
        node = crossing.pop()
        if node in seen:
            continue
        seen.add(node)
        if _is_size_source(node):
            sources.add(node)
        else:
            crossing.extend(a for a in node.all_input_nodes if a in derived)
    return sources


class _Recorder(fx.Interpreter):
    """Run a graph and record each tensor's metadata and the values that size sources read."""

    def __init__(self, gm: fx.GraphModule, key: str, tensors: bool) -> None:
        super().__init__(gm)
        self.key = key
        self.tensors = tensors

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            if self.tensors:
                n.meta["tensor_meta"] = _extract_tensor_metadata(result)
        elif _is_size_source(n):
            n.meta[self.key] = result
        return result


def _record(gm: fx.GraphModule, example: torch.Tensor, key: str, tensors: bool) -> Any:
    """Run `gm` in eval mode without gradients or RNG side effects, recording shapes."""
    devices = [example.device] if example.device.type == "cuda" else []
    with _mode(gm, False), torch.no_grad(), torch.random.fork_rng(devices=devices):
        return _Recorder(gm, key, tensors).run(example)


def _attach_size_specs(
    gm: fx.GraphModule, example: Callable[[int], torch.Tensor], recorded: bool, model_name: str
) -> None:
    """Record how to rebuild each size source that a later stage may need (batch 2 vs. 3)."""
    sources = _crossing_sources(gm, _cut_nodes(gm))
    if not sources:
        return
    # Running the train-mode graph may update buffers (batch norm with `training=True` baked
    # in by the trace); the model must come out of tracing unchanged.
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        if not recorded:
            _record(gm, example(2), "size_value", tensors=False)
        _record(gm, example(3), "size_value_b3", tensors=False)
    except Exception as err:
        mode = "train" if gm.training else "eval"
        raise TraceError(
            f"{model_name}'s {mode}-mode graph failed on a batch of 3 ({type(err).__name__}: "
            f"{err}). Hint: the model must accept any batch size."
        ) from err
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
    for node in sources:
        node.meta["size_spec"] = _size_spec(
            node.meta.get("size_value"), node.meta.get("size_value_b3")
        )


def _size_spec(small: Any, large: Any) -> tuple | None:
    """How to rebuild a size source's value in another stage, from its values at batch 2 and 3.

    Each integer is `k * batch + m`; a device comes from the stage input; a floating dtype too
    (so that `net.half()` keeps working), any other dtype is a constant.
    """

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if is_int(small) and is_int(large):
        k = large - small
        return ("int", k, small - 2 * k)
    if (
        isinstance(small, tuple)
        and isinstance(large, tuple)
        and len(small) == len(large)
        and all(is_int(a) and is_int(b) for a, b in zip(small, large))
    ):
        return ("size", tuple((b - a, a - 2 * (b - a)) for a, b in zip(small, large)))
    if isinstance(small, torch.device):
        return ("device",)
    if isinstance(small, torch.dtype):
        return ("dtype", small)
    return None


def _rebuilt_size(x: torch.Tensor, dims: tuple[tuple[int, int], ...]) -> torch.Size:
    """A size read in an earlier stage, rebuilt from this stage's batch size."""
    batch = x.shape[0]
    return torch.Size(k * batch + m for k, m in dims)


def _rebuilt_int(x: torch.Tensor, k: int, m: int) -> int:
    """An integer read from a size in an earlier stage, rebuilt from this stage's batch size."""
    return k * x.shape[0] + m


def _rebuild(graph: fx.Graph, source: fx.Node, x: fx.Node) -> Any:
    """The node (or constant) that gives `source`'s value in a stage whose input is `x`."""
    spec = source.meta.get("size_spec")
    name = source.meta.get("qualname", source.name)
    if spec is None:
        raise TraceError(
            f"The size read at {name!r} is needed in a later stage but could not be rebuilt "
            "there. Hint: choose other exit points from `earlyexit.profile(model).candidates`."
        )
    kind = spec[0]
    if kind == "int" and spec[1] == 0:
        return spec[2]
    if kind == "int":
        return graph.call_function(_rebuilt_int, (x, spec[1], spec[2]))
    if kind == "size":
        return graph.call_function(_rebuilt_size, (x, spec[1]))
    if kind == "device" or (kind == "dtype" and spec[1].is_floating_point):
        return graph.call_function(getattr, (x, kind))
    return spec[1]


_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_CHANNELS_FIRST_FN = {
    torch.conv1d,
    torch.conv2d,
    torch.conv3d,
    nn.functional.conv1d,
    nn.functional.conv2d,
    nn.functional.batch_norm,
    nn.functional.group_norm,
}
_CHANNELS_LAST_FN = {nn.functional.linear, nn.functional.layer_norm, torch.layer_norm}


def _layout_of(node: fx.Node, gm: fx.GraphModule, ndim: int) -> int | None:
    """The channel axis an op implies for its input, or None when it says nothing."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, _CHANNELS_FIRST):
            return 1
        if isinstance(m, (nn.Linear, nn.LayerNorm, nn.MultiheadAttention)):
            return ndim - 1
    elif node.op == "call_function":
        if node.target in _CHANNELS_FIRST_FN:
            return 1
        if node.target in _CHANNELS_LAST_FN:
            return ndim - 1
    return None


def _channel_axis(node: fx.Node, gm: fx.GraphModule, shape: torch.Size) -> int:
    """Find the channel axis of a feature from the ops that consume or produce it.

    Only ops that see the feature itself, or an elementwise function of it with the same
    shape, are asked: a permute or a reshape on the way says nothing about this layout.
    """
    ndim = len(shape)

    def same_shape(n: fx.Node) -> bool:
        meta = n.meta.get("tensor_meta")
        return getattr(meta, "shape", None) == shape

    seen, queue = {node}, deque([node])
    while queue:
        for user in queue.popleft().users:
            if user in seen:
                continue
            seen.add(user)
            axis = _layout_of(user, gm, ndim)
            if axis is not None:
                return axis
            if same_shape(user):
                queue.append(user)
    current: fx.Node | None = node
    while current is not None and same_shape(current):
        axis = _layout_of(current, gm, ndim)
        if axis is not None:
            return axis
        inputs = current.all_input_nodes
        current = inputs[0] if inputs else None
    # Nothing in the graph says: square spatial axes decide, then the usual convention.
    if ndim == 4 and shape[1] == shape[2] and shape[3] != shape[1]:
        return 3
    return 1 if ndim == 4 else ndim - 1


def trace_model(model: nn.Module, input_size: tuple[int, ...]) -> TracedModel:
    """Trace a model in eval and train mode and find its candidate cut points.

    The model is left exactly as it was: its modules' `training` flags are restored and
    no buffer is updated (shapes are propagated in eval mode under `torch.no_grad`).

    Sizes read from a feature (`B, C, H, W = x.shape`) and values computed from them alone
    don't hide cut points: a stage that needs one rebuilds it, taking the batch size from its
    own input and every other dimension from the traced `input_size`.

    Args:
        model: a classifier whose forward takes one image batch and returns `(B, num_classes)`.
        input_size: `(C, H, W)` of one sample.

    Returns:
        The traced graphs and the candidate cut points.

    Raises:
        TraceError: when the model cannot be traced or is not a classifier.
    """
    name = type(model).__name__
    eval_gm, _ = _trace_one(model, training=False)
    train_gm, _ = _trace_one(model, training=True)
    batch = 2
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def example(n: int) -> torch.Tensor:
        return torch.zeros(n, *input_size, device=device, dtype=dtype)

    try:
        out = _record(eval_gm, example(batch), "size_value", tensors=True)
    except Exception as err:
        raise TraceError(
            f"{name} failed on an input of shape {(batch, *input_size)} "
            f"({type(err).__name__}: {err}). Hint: check `input_size` (C, H, W)."
        ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TraceError(
            f"{name} is not a classifier: its output is {got}, expected (B, num_classes). "
            "Hint: convert a model whose forward returns class logits."
        )
    for gm in (eval_gm, train_gm):
        _attach_size_specs(gm, example, recorded=gm is eval_gm, model_name=name)
    features = []
    for node in _cut_nodes(eval_gm):
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if (
            shape is not None
            and len(shape) in (3, 4)
            and shape[0] == batch
            and meta.dtype.is_floating_point
        ):
            features.append(node)
    cut_points = [
        CutPoint(n.meta["qualname"], tuple(n.meta["tensor_meta"].shape[1:]), axis)
        for n in _block_outputs_only(features)
        for axis in [_channel_axis(n, eval_gm, n.meta["tensor_meta"].shape)]
    ]
    return TracedModel(eval_gm, train_gm, cut_points, tuple(input_size), int(out.shape[1]))


def _block_outputs_only(cuts: list[fx.Node]) -> list[fx.Node]:
    """Drop the cut points inside a module whose own output is also a cut point.

    At most one exit per block, seeing the block's output: a ViT block's first residual sum
    or a ConvNeXt downsample's permute is inside a module (the block, the norm) whose output
    is a cut point too. A cut point that is the output of a module nested in that module
    (a block's output inside its stage) stays.
    """
    blocks = set().union(*(n.meta["module_outputs"] for n in cuts)) if cuts else set()

    def within(path: str, module: str) -> bool:
        return path == module or path.startswith(module + ".")

    def inside_a_block(node: fx.Node) -> bool:
        scope, outputs = node.meta["scope"], node.meta["module_outputs"]
        return any(
            within(scope, block) and not any(within(o, block) for o in outputs) for block in blocks
        )

    return [n for n in cuts if not inside_a_block(n)]


def _find(graph: fx.Graph, name: str) -> fx.Node:
    for node in graph.nodes:
        if node.meta.get("qualname") == name:
            return node
    raise TraceError(
        f"No node named {name!r} in the traced graph. Hint: `earlyexit.profile(model)` lists "
        "the cut points."
    )


def split_stages(gm: fx.GraphModule, names: list[str]) -> list[fx.GraphModule]:
    """Split a traced graph after the named cut points into `len(names) + 1` stages.

    Each stage takes one tensor and returns one; the stages share the traced module's
    parameters, and running them in order equals running the whole graph.

    Args:
        gm: a graph from `trace_model`.
        names: qualified names of cut points, in execution order.

    Returns:
        The stages, as `GraphModule`s.

    Raises:
        TraceError: when a name is not a cut point of this graph.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    cuts = [_find(graph, name) for name in names]
    valid = set(_cut_nodes(gm))
    for name, node in zip(names, cuts):
        if node not in valid:
            raise TraceError(
                f"{name!r} is not a cut point of the {'train' if gm.training else 'eval'}-mode "
                "graph: other values computed before it are still needed after it. Hint: "
                "choose a node from `earlyexit.profile(model).candidates`."
            )
    bounds = [index[c] for c in cuts]
    if bounds != sorted(set(bounds)):
        raise TraceError(
            f"Cut points {names} are not in execution order or repeat. Hint: list them in the "
            "order of `earlyexit.profile(model).candidates`, each once."
        )
    dependent = _input_dependent(graph)
    derived = _size_derived(gm, dependent)
    starts = [0, *(b + 1 for b in bounds)]
    ends = [*(b + 1 for b in bounds), len(nodes)]
    stages = []
    for s, (start, end) in enumerate(zip(starts, ends)):
        new = fx.Graph()
        env: dict[fx.Node, Any] = {}
        rebuilt: list[fx.Node] = []
        x = new.placeholder("x") if s > 0 else None
        if s > 0:
            env[cuts[s - 1]] = x

        def lookup(n: fx.Node, new=new, env=env, x=x, rebuilt=rebuilt, s=s) -> Any:
            if n not in env:
                if n in derived:
                    # A size (or a value computed from sizes) from an earlier stage.
                    if _is_size_source(n):
                        env[n] = _rebuild(new, n, x)
                    else:
                        env[n] = new.node_copy(n, lookup)
                    if isinstance(env[n], fx.Node):
                        rebuilt.append(env[n])
                elif n in dependent:
                    raise TraceError(
                        f"Stage {s} needs {n.meta.get('qualname', n.name)!r} from an earlier "
                        "stage besides its input. Hint: choose exit points from "
                        "`earlyexit.profile(model).candidates`."
                    )
                else:
                    # Input-independent values are rebuilt in each stage that needs them.
                    env[n] = new.node_copy(n, lookup)
            return env[n]

        for node in nodes[start:end]:
            if node.op == "output":
                new.output(fx.map_arg(node.args[0], lookup))
            elif node in derived and _is_size_source(node) and node.args[0] not in env:
                env[node] = _rebuild(new, node, x)
            elif node in dependent:
                env[node] = new.node_copy(node, lookup)
                if node in derived:
                    rebuilt.append(env[node])
        if s < len(cuts):
            new.output(env[cuts[s]])
        # Sizes read here only for a later stage (which rebuilds them) are dead weight.
        for n in reversed(rebuilt):
            if not n.users and n.op in ("call_function", "call_method") and not _has_effect(n):
                new.erase_node(n)
        stage = fx.GraphModule(gm, new, class_name=f"Stage{s}")
        stage.training = gm.training
        stages.append(stage)
    return stages
