"""Tracing a model with torch.fx, timm-aware, and naming its nodes by their module paths.

The tracer knows timm's untraceable modules and functions (`timm.layers._fx`), specialises
forward arguments after the image to their defaults, and keeps only the logits of a model that
returns a tuple (see `earlyexit.fx._cleanup`).

Nodes are named by dotted qualified paths (`layer1.2`, `stages.2.blocks.0.add`), never by raw
FX names. A node that is a module's output is named by the innermost module whose output it
is, as torchvision's feature extractor names nodes: the output of resnet20's third block in
`layer1` is `layer1.2`. A layer that closes a block gives its name to the block (the block's
last ReLU `layer1.2.act2` is `layer1.2`). The other modules whose output the node is (`layer1`,
`layer1.2.act2`) are its aliases, and so is the name earlier versions of the library gave it
(the outermost module's), so that saved files keep loading. Any other node is named after the
innermost module it was computed in plus its operation (`layer1.0.add`, `layer1.0.add_1`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import fx, nn

from earlyexit._modes import set_mode
from earlyexit.errors import TraceError
from earlyexit.fx._cleanup import drop_specialised_placeholders, extra_arguments, keep_first_output

__all__ = ["NodeName", "TracedGraph", "trace_graph"]


@dataclass(frozen=True)
class NodeName:
    """The names of one node of a traced graph.

    Attributes:
        name: the node's dotted qualified name, unique in its graph.
        scope: the innermost module the node was computed in (`""` at the top level).
        modules: every module whose output the node is, innermost first.
        legacy: the name earlier versions of the library gave the node: the outermost
            module whose output it is.
    """

    name: str
    scope: str = ""
    modules: tuple[str, ...] = ()
    legacy: str = ""

    @property
    def aliases(self) -> tuple[str, ...]:
        """The node's other names, each of which a user may pass for it."""
        out: list[str] = []
        for alias in (*self.modules, self.legacy):
            if alias and alias != self.name and alias not in out:
                out.append(alias)
        return tuple(out)


@dataclass(frozen=True, eq=False)
class TracedGraph:
    """A model traced in one mode.

    Attributes:
        module: the traced graph, returning the model's logits.
        names: the names of every node of `module.graph`.
    """

    module: fx.GraphModule
    names: Mapping[fx.Node, NodeName]

    @property
    def training(self) -> bool:
        """The mode the model was traced in."""
        return self.module.training

    def name(self, node: fx.Node) -> str:
        """A node's qualified name (its FX name for a node made after tracing)."""
        named = self.names.get(node)
        return named.name if named is not None else node.name


class _PathTracer(fx.Tracer):
    """A tracer that knows timm's untraceable modules and functions and records module paths."""

    def __init__(self) -> None:
        from timm.layers import _fx as timm_fx

        super().__init__(autowrap_functions=tuple(timm_fx.get_notrace_functions()))
        self._timm_leaves = tuple(timm_fx.get_notrace_modules())
        self._path = ""
        self.node_scope: dict[fx.Node, str] = {}
        # Per node, the modules that returned it, (path, is a leaf), innermost first: a call
        # returns after the calls nested in it.
        self.module_calls: dict[fx.Node, list[tuple[str, bool]]] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, self._timm_leaves):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m, forward, args, kwargs):
        outer = self._path
        path = self.path_of_module(m)
        leaf = self.is_leaf_module(m, path)
        self._path = path
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._path = outer
        if isinstance(out, fx.Proxy) and path:
            self.module_calls.setdefault(out.node, []).append((path, leaf))
        return out

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        self.node_scope[node] = self._path
        return node


def trace_graph(model: nn.Module, training: bool) -> TracedGraph:
    """Trace a classifier in one mode, taking the image alone and returning the logits alone.

    The model comes back as it was: every module's `training` flag is restored.

    Args:
        model: the classifier.
        training: the mode to trace it in (control flow on `self.training` is fixed by it).

    Returns:
        The traced graph and its node names.

    Raises:
        TraceError: when torch.fx cannot trace the model.
    """
    name = type(model).__name__
    tracer = _PathTracer()
    attributes = set(vars(model))
    try:
        with set_mode(model, training):
            try:
                graph = tracer.trace(model, concrete_args=extra_arguments(model) or None)
            except TraceError:
                raise
            except Exception as err:
                raise TraceError(
                    f"torch.fx could not trace {name} ({type(err).__name__}: {err}). Hint: the "
                    "model has data-dependent control flow; register the offending function or "
                    "module as a leaf with `timm.layers.register_notrace_function` / "
                    "`register_notrace_module`, or simplify its forward."
                ) from err
        drop_specialised_placeholders(graph, name)
        gm = fx.GraphModule(tracer.root, graph, class_name=f"Traced{name}")
    finally:
        # torch.fx stows the tensors made while tracing (`_tensor_constant0`) on the model;
        # the graph module holds its own references to them.
        for attribute in set(vars(model)) - attributes:
            delattr(model, attribute)
    keep_first_output(gm)
    gm.training = training
    return TracedGraph(gm, _node_names(gm.graph, tracer))


def _innermost(calls: list[tuple[str, bool]]) -> str:
    """The innermost module's path; a layer that closes a block gives way to the block."""
    (path, leaf), *outer = calls
    if leaf and outer and path.startswith(outer[0][0] + "."):
        return outer[0][0]
    return path


def _outermost(calls: list[tuple[str, bool]]) -> str:
    return calls[-1][0]


def _unique_names(
    graph: fx.Graph, tracer: _PathTracer, pick: Callable[[list[tuple[str, bool]]], str]
) -> dict[fx.Node, str]:
    names: dict[fx.Node, str] = {}
    used: dict[str, int] = {}
    for node in graph.nodes:
        calls = tracer.module_calls.get(node)
        if calls:
            name = pick(calls)
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


def _node_names(graph: fx.Graph, tracer: _PathTracer) -> dict[fx.Node, NodeName]:
    names = _unique_names(graph, tracer, _innermost)
    legacy = _unique_names(graph, tracer, _outermost)
    return {
        node: NodeName(
            name=names[node],
            scope=tracer.node_scope.get(node, ""),
            modules=tuple(path for path, _ in tracer.module_calls.get(node, ())),
            legacy=legacy[node],
        )
        for node in graph.nodes
    }
