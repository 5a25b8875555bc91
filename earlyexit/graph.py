"""Tracing a model with torch.fx, finding its cut points, and splitting it into stages.

A *cut point* is a node of the traced graph after which the node's own output is the only value
that later nodes still need; values that do not depend on the input (parameters, buffers,
constants and whatever is computed from them alone) don't count, since any stage can rebuild
them. Splitting the graph at cut points gives stages with one input and one output each, which
share the original model's parameters.

Nodes are named by their dotted qualified path (`layer1.0`, `stages.2.blocks.0.add`), never by
raw FX names: the outermost module whose output a node is gives it its name, otherwise the
innermost module it was computed in plus the operation (`layer1.0.add`, `layer1.0.add_1`).
"""

from __future__ import annotations

import inspect
import re
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

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


def _keep_first_output(graph: fx.Graph) -> None:
    """Make a graph that returns a tuple (e.g. logits and auxiliary logits) return the logits."""
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    value = output.args[0]
    if isinstance(value, (tuple, list)):
        output.args = (value[0],)
        graph.eliminate_dead_code()


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
    _keep_first_output(graph)
    gm = fx.GraphModule(tracer.root, graph, class_name=f"Traced{name}")
    gm.training = training
    names = _qualified_names(gm.graph, tracer)
    by_name = {q: n for n, q in names.items()}
    for node, q in names.items():
        node.meta["qualname"] = q
    return gm, by_name


def _input_dependent(graph: fx.Graph) -> set[fx.Node]:
    dependent: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _cut_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Input-dependent nodes after which only their own output is still needed."""
    nodes = list(graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    dependent = _input_dependent(graph)
    live = [0] * (len(nodes) + 1)
    for node in dependent:
        if not node.users:
            continue
        last = max(index[u] for u in node.users)
        live[index[node]] += 1
        live[last] -= 1
    cuts, count = [], 0
    for i, node in enumerate(nodes):
        count += live[i]
        if (
            count == 1
            and node in dependent
            and node.users
            and node.op not in ("placeholder", "output")
        ):
            cuts.append(node)
    return cuts


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
    example = torch.zeros(batch, *input_size, device=device, dtype=dtype)
    with _mode(eval_gm, False), torch.no_grad():
        try:
            out = ShapeProp(eval_gm).propagate(example)
        except Exception as err:
            raise TraceError(
                f"{name} failed on an input of shape {tuple(example.shape)} "
                f"({type(err).__name__}: {err}). Hint: check `input_size` (C, H, W)."
            ) from err
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TraceError(
            f"{name} is not a classifier: its output is {got}, expected (B, num_classes). "
            "Hint: convert a model whose forward returns class logits."
        )
    cut_points = []
    for node in _cut_nodes(eval_gm.graph):
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if (
            shape is None
            or len(shape) not in (3, 4)
            or shape[0] != batch
            or not meta.dtype.is_floating_point
        ):
            continue
        axis = _channel_axis(node, eval_gm, shape)
        cut_points.append(CutPoint(node.meta["qualname"], tuple(shape[1:]), axis))
    return TracedModel(eval_gm, train_gm, cut_points, tuple(input_size), int(out.shape[1]))


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
    valid = set(_cut_nodes(graph))
    for name, node in zip(names, cuts):
        if node not in valid:
            raise TraceError(
                f"{name!r} is not a cut point of the {'train' if gm.training else 'eval'}-mode "
                "graph: other values computed before it are still needed after it. Hint: "
                "choose a node from `earlyexit.profile(model).candidates`."
            )
    bounds = [index[c] for c in cuts]
    if bounds != sorted(set(bounds)):
        raise TraceError(f"Cut points {names} are not in execution order or repeat.")
    dependent = _input_dependent(graph)
    starts = [0, *(b + 1 for b in bounds)]
    ends = [*(b + 1 for b in bounds), len(nodes)]
    stages = []
    for s, (start, end) in enumerate(zip(starts, ends)):
        new = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        if s > 0:
            env[cuts[s - 1]] = new.placeholder("x")

        def lookup(n: fx.Node, new=new, env=env) -> fx.Node:
            if n not in env:
                if n in dependent:
                    raise TraceError(f"Stage split leaks {n.meta.get('qualname', n.name)}.")
                # Input-independent values are rebuilt in each stage that needs them.
                env[n] = new.node_copy(n, lookup)
            return env[n]

        for node in nodes[start:end]:
            if node.op == "output":
                new.output(fx.map_arg(node.args[0], lookup))
            elif node in dependent:
                env[node] = new.node_copy(node, lookup)
        if s < len(cuts):
            new.output(env[cuts[s]])
        stage = fx.GraphModule(gm, new, class_name=f"Stage{s}")
        stage.training = gm.training
        stages.append(stage)
    return stages
