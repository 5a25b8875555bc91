"""Where a traced model can be cut: liveness, cut points, and the features there.

A *cut point* is a node of the traced graph after which the node's own output is the only value
that later nodes still need; values that do not depend on the input (parameters, buffers,
constants and whatever is computed from them alone) don't count, since any stage can rebuild
them. Neither do sizes read from a feature nor values computed from sizes alone: a later stage
that needs one rebuilds it (`earlyexit.fx.sizes`). Splitting the graph at cut points gives
stages with one input and one output each (`earlyexit.fx.split`).

Each traced graph is analysed once, into a frozen `GraphAnalysis`; `analyse_model` traces a
model in both modes and analyses both graphs into a `ModelAnalysis`, whose cut points are the
candidates for exits.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import TensorMetadata

from earlyexit.errors import TraceError
from earlyexit.fx._layout import channel_axis
from earlyexit.fx._ops import is_random, is_size_source
from earlyexit.fx.sizes import Recording, SizeSpec, record, record_size_specs
from earlyexit.fx.trace import NodeName, TracedGraph, trace_graph

__all__ = [
    "CutPoint",
    "GraphAnalysis",
    "ModelAnalysis",
    "analyse_graph",
    "analyse_model",
    "find_by_name",
]


@dataclass(frozen=True)
class CutPoint:
    """A node where the traced graph can be split and an exit can see a feature tensor.

    Attributes:
        name: dotted qualified name of the node.
        shape: the feature's shape for one sample, without the batch axis.
        channel_axis: the axis of the full `(B, ...)` feature that holds the channels.
        aliases: the node's other names (the other modules whose output it is).
    """

    name: str
    shape: tuple[int, ...]
    channel_axis: int
    aliases: tuple[str, ...] = ()


class _Named(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def aliases(self) -> tuple[str, ...]: ...


def find_by_name(name: str, items: Sequence[_Named]) -> int | None:
    """The index of the item called `name`, else of the first with `name` among its aliases.

    A module called more than once is an alias of each of its outputs: the first one wins.

    Example:
        >>> points = [CutPoint("layer1.1", (16, 32, 32), 1), CutPoint("layer1.2", (16, 32, 32), 1,
        ...     aliases=("layer1", "layer1.2.act2"))]
        >>> find_by_name("layer1.2", points), find_by_name("layer1", points)
        (1, 1)
        >>> find_by_name("layer9", points) is None
        True
    """
    for i, item in enumerate(items):
        if item.name == name:
            return i
    for i, item in enumerate(items):
        if name in item.aliases:
            return i
    return None


@dataclass(frozen=True, eq=False)
class GraphAnalysis:
    """What splitting one traced graph needs to know, computed once by `analyse_graph`.

    Attributes:
        traced: the graph and its node names.
        order: each node's position in the graph.
        dependent: the nodes whose values depend on the input.
        size_derived: the input-dependent nodes that depend on it only through sizes.
        cuts: every cut point of the graph, in execution order (features or not).
        sizes: how to rebuild each size source whose value some later stage may need; None
            where it cannot be rebuilt.
    """

    traced: TracedGraph
    order: Mapping[fx.Node, int]
    dependent: frozenset[fx.Node]
    size_derived: frozenset[fx.Node]
    cuts: tuple[fx.Node, ...]
    sizes: Mapping[fx.Node, SizeSpec | None]

    @property
    def module(self) -> fx.GraphModule:
        """The traced graph module."""
        return self.traced.module

    @property
    def training(self) -> bool:
        """The mode the graph was traced in."""
        return self.traced.training

    def name(self, node: fx.Node) -> str:
        """A node's qualified name."""
        return self.traced.name(node)

    def node(self, name: str) -> fx.Node | None:
        """The node with this name or alias, if any."""
        nodes = list(self.traced.names)
        k = find_by_name(name, [self.traced.names[n] for n in nodes])
        return None if k is None else nodes[k]


def analyse_graph(
    traced: TracedGraph,
    example: Callable[[int], torch.Tensor],
    at_batch_2: Recording | None,
    model_name: str,
) -> GraphAnalysis:
    """Find the cut points of a traced graph and record the sizes its stages will rebuild.

    Args:
        traced: the graph.
        example: an input batch of a given size, to record sizes with.
        at_batch_2: a recording of the graph at batch 2 already made, if any.
        model_name: how errors name the model.

    Raises:
        TraceError: when the graph fails on another batch size.
    """
    gm = traced.module
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    dependent = _input_dependent(nodes)
    derived = _size_derived(gm, nodes, dependent)
    cuts = _cut_nodes(nodes, order, dependent, derived)
    sources = _crossing_sources(cuts, order, derived)
    sizes = record_size_specs(gm, sources, example, at_batch_2, model_name)
    return GraphAnalysis(traced, order, frozenset(dependent), frozenset(derived), cuts, sizes)


def _input_dependent(nodes: Sequence[fx.Node]) -> set[fx.Node]:
    dependent: set[fx.Node] = set()
    for node in nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _size_derived(
    gm: fx.GraphModule, nodes: Sequence[fx.Node], dependent: Collection[fx.Node]
) -> set[fx.Node]:
    """Input-dependent nodes that depend on the input only through sizes (shape arithmetic,
    `cls_token.expand(x.shape[0], -1, -1)`, position embeddings for the input's grid).

    A later stage recomputes them instead of receiving them, so they do not hide cut points;
    the batch size they use is then the later stage's own (which early-exit inference shrinks).
    """
    derived: set[fx.Node] = set()
    for node in nodes:
        if node not in dependent or node.op in ("placeholder", "output"):
            continue
        if is_size_source(node):
            derived.add(node)
            continue
        inputs = [a for a in node.all_input_nodes if a in dependent]
        if inputs and all(a in derived for a in inputs) and not is_random(node, gm):
            derived.add(node)
    return derived


def _cut_nodes(
    nodes: Sequence[fx.Node],
    order: Mapping[fx.Node, int],
    dependent: Collection[fx.Node],
    derived: Collection[fx.Node],
) -> tuple[fx.Node, ...]:
    """Input-dependent nodes after which only their own output is still needed.

    Values computed from the input's size alone don't count: later stages rebuild them.
    """
    live_values = [n for n in nodes if n in dependent and n not in derived]
    live = [0] * (len(nodes) + 1)
    for node in live_values:
        # Reading a feature's size later does not keep the feature alive: it can be rebuilt.
        uses = [order[u] for u in node.users if not is_size_source(u)]
        if not uses:
            continue
        live[order[node]] += 1
        live[max(uses)] -= 1
    live_set = set(live_values)
    cuts, count = [], 0
    for i, node in enumerate(nodes):
        count += live[i]
        if (
            count == 1
            and node in live_set
            and any(not is_size_source(u) for u in node.users)
            and node.op not in ("placeholder", "output")
        ):
            cuts.append(node)
    return tuple(cuts)


def _crossing_sources(
    cuts: Sequence[fx.Node], order: Mapping[fx.Node, int], derived: Collection[fx.Node]
) -> set[fx.Node]:
    """The size sources whose values some later stage needs when split at every cut point."""
    bounds = sorted(order[c] for c in cuts)

    def crosses(start: int, end: int) -> bool:
        k = bisect_left(bounds, start)
        return k < len(bounds) and bounds[k] < end

    crossing = [
        node
        for node in derived
        if any(crosses(order[node], order[u]) for u in node.users)
        or (is_size_source(node) and crosses(order[node.args[0]], order[node]))
    ]
    sources: set[fx.Node] = set()
    seen: set[fx.Node] = set()
    while crossing:
        node = crossing.pop()
        if node in seen:
            continue
        seen.add(node)
        if is_size_source(node):
            sources.add(node)
        else:
            crossing.extend(a for a in node.all_input_nodes if a in derived)
    return sources


@dataclass(frozen=True, eq=False)
class ModelAnalysis:
    """A model traced and analysed in eval and train mode, with its feature cut points.

    Attributes:
        eval_graph: the analysis of the graph traced with the model in eval mode.
        train_graph: the analysis of the graph traced with the model in train mode.
        cut_points: every cut point of the eval graph whose output is a feature tensor, at
            most one per block, in execution order.
        input_size: the `(C, H, W)` the graphs were run at.
        num_classes: the size of the model's output.
        activation_elements: the elements per sample of the eval graph's largest tensor with
            a batch dimension, at `input_size` (0 when none was recorded).
    """

    eval_graph: GraphAnalysis
    train_graph: GraphAnalysis
    cut_points: tuple[CutPoint, ...]
    input_size: tuple[int, ...]
    num_classes: int
    activation_elements: int = 0

    def find(self, name: str) -> CutPoint | None:
        """The cut point with this name or alias, if any."""
        k = find_by_name(name, self.cut_points)
        return None if k is None else self.cut_points[k]


def analyse_model(model: nn.Module, input_size: tuple[int, ...]) -> ModelAnalysis:
    """Trace a model in eval and train mode, analyse both graphs and find its cut points.

    The model is left exactly as it was: its modules' `training` flags are restored and
    no buffer is updated (shapes are propagated in eval mode under `torch.no_grad`).

    Sizes read from a feature (`B, C, H, W = x.shape`) and values computed from them alone
    don't hide cut points: a stage that needs one rebuilds it, taking the batch size from its
    own input and every other dimension from the traced `input_size`.

    Args:
        model: a classifier whose forward takes one image batch and returns `(B, num_classes)`.
        input_size: `(C, H, W)` of one sample.

    Returns:
        The analysis, with the candidate cut points.

    Raises:
        TraceError: when the model cannot be traced or is not a classifier.
    """
    name = type(model).__name__
    eval_traced = trace_graph(model, training=False)
    train_traced = trace_graph(model, training=True)
    batch = 2
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32

    def example(n: int) -> torch.Tensor:
        return torch.zeros(n, *input_size, device=device, dtype=dtype)

    try:
        first = record(eval_traced.module, example(batch), tensors=True)
    except Exception as err:
        raise TraceError(
            f"{name} failed on an input of shape {(batch, *input_size)} "
            f"({type(err).__name__}: {err}). Hint: check `input_size` (C, H, W)."
        ) from err
    out = first.output
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != batch:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TraceError(
            f"{name} is not a classifier: its output is {got}, expected (B, num_classes). "
            "Hint: convert a model whose forward returns class logits."
        )
    eval_graph = analyse_graph(eval_traced, example, first, name)
    train_graph = analyse_graph(train_traced, example, None, name)
    features = []
    for node in eval_graph.cuts:
        meta = first.tensors.get(node)
        if (
            meta is not None
            and len(meta.shape) in (3, 4)
            and meta.shape[0] == batch
            and meta.dtype.is_floating_point
        ):
            features.append(node)
    names = eval_traced.names
    cut_points = tuple(
        CutPoint(
            names[n].name,
            tuple(first.tensors[n].shape[1:]),
            channel_axis(n, eval_traced.module, first.tensors),
            names[n].aliases,
        )
        for n in _block_outputs_only(features, names)
    )
    return ModelAnalysis(
        eval_graph,
        train_graph,
        cut_points,
        tuple(input_size),
        int(out.shape[1]),
        _largest_sample_elements(first.tensors.values(), batch),
    )


def _largest_sample_elements(tensors: Iterable[TensorMetadata], batch: int) -> int:
    """The elements per sample of the largest tensor whose first dimension is the batch."""
    sizes = [
        math.prod(meta.shape[1:])
        for meta in tensors
        if len(meta.shape) > 1 and meta.shape[0] == batch
    ]
    return max(sizes, default=0)


def _block_outputs_only(cuts: list[fx.Node], names: Mapping[fx.Node, NodeName]) -> list[fx.Node]:
    """Drop the cut points inside a module whose own output is also a cut point.

    At most one exit per block, seeing the block's output: a ViT block's first residual sum
    or a ConvNeXt downsample's permute is inside a module (the block, the norm) whose output
    is a cut point too. A cut point that is the output of a module nested in that module
    (a block's output inside its stage) stays.
    """
    blocks = {m for n in cuts for m in names[n].modules}

    def within(path: str, module: str) -> bool:
        return path == module or path.startswith(module + ".")

    def inside_a_block(node: fx.Node) -> bool:
        scope, outputs = names[node].scope, names[node].modules
        return any(
            within(scope, block) and not any(within(o, block) for o in outputs) for block in blocks
        )

    return [n for n in cuts if not inside_a_block(n)]
