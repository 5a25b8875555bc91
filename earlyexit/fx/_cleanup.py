"""Cleaning up a fresh trace: extra forward arguments, extra outputs and the code they leave.

A classifier's forward may take arguments besides the image (each specialised to its default)
and may return more than the logits (auxiliary logits in train mode, GoogLeNet's namedtuple).
The traced graph takes the image alone and returns the logits alone.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import fx, nn

from earlyexit.errors import TraceError
from earlyexit.fx._ops import has_effect

__all__ = ["drop_specialised_placeholders", "extra_arguments", "keep_first_output"]


def extra_arguments(model: nn.Module) -> dict[str, Any]:
    """Specialise every forward argument after the first to its default value.

    Raises:
        TraceError: when an argument has no default.
    """
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


def drop_specialised_placeholders(graph: fx.Graph, model_name: str) -> None:
    """Remove the placeholders of specialised arguments and the asserts that check them.

    Raises:
        TraceError: when a specialised argument feeds the computation, not just an assert.
    """
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


def keep_first_output(gm: fx.GraphModule) -> None:
    """Make a graph that returns a tuple (e.g. logits and auxiliary logits) return the logits,
    and prune what fed only the rest."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
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
        return
    output.args = (first,)
    _eliminate_dead_code(gm)
    gm.recompile()


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
        elif has_effect(node):
            continue
        gm.graph.erase_node(node)
