"""Tracing a classifier with torch.fx, analysing the graph, and splitting it into stages.

The data flows one way, one module a step:

- `trace`: the timm-aware tracer; a graph that takes the image and returns the logits
  (`_cleanup`), its nodes named by module path (`TracedGraph`).
- `analysis`: liveness, cut points and the channel axis of their features (`_layout`), for
  both modes of a model (`ModelAnalysis`), computed once.
- `sizes`: the sizes a later stage rebuilds from its own input (`SizeSpec`).
- `split`: the stages of both modes, split at the same cut points (`StagedGraph`).

Nothing here knows about exit heads, losses or inference.
"""

from earlyexit.fx.analysis import CutPoint, GraphAnalysis, ModelAnalysis, analyse_model
from earlyexit.fx.sizes import SizeSpec
from earlyexit.fx.split import StagedGraph, split_graph, split_model
from earlyexit.fx.trace import NodeName, TracedGraph, trace_graph

__all__ = [
    "CutPoint",
    "GraphAnalysis",
    "ModelAnalysis",
    "NodeName",
    "SizeSpec",
    "StagedGraph",
    "TracedGraph",
    "analyse_model",
    "split_graph",
    "split_model",
    "trace_graph",
]
