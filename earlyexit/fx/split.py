"""Splitting an analysed model at its exits' cut points into stages, in both modes.

Each stage is a `GraphModule` with one input and one output; the stages share the model's
parameters, and running them in order equals running the model. Control flow that depends on
`self.training` is fixed at trace time, so a `StagedGraph` keeps the stages of the train-mode
and of the eval-mode graph, split at the same cut points, as torchvision's `DualGraphModule`
keeps both graphs of a feature extractor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn

from earlyexit.errors import TraceError
from earlyexit.fx._fold import fold_batchnorm as fold_stage
from earlyexit.fx._fold import folded_pairs
from earlyexit.fx._inplace import rewrite_chain, rewrite_inplace
from earlyexit.fx._ops import has_effect, is_size_source
from earlyexit.fx._pointwise import fuse_pointwise
from earlyexit.fx.analysis import CutPoint, GraphAnalysis, ModelAnalysis

__all__ = ["StagedGraph", "split_graph", "split_model"]


class StagedGraph(nn.Module):
    """A model's stages for both modes, split after the same cut points.

    The stages hold the model's own layers and parameters, so they are not registered as
    submodules: a module that holds both the model and its `StagedGraph` names every weight
    once in its `state_dict()`. What tracing attached to the stages themselves (tensor
    constants, buffers of traced-through modules) moves with `.to()`, `.half()`, `.cuda()`.

    Args:
        stages: per mode (`True` for training), the `len(cut_points) + 1` stages.
        cut_points: the cut point after which each stage but the last ends.
        input_size: the `(C, H, W)` the model was traced at.
        num_classes: the size of the model's output.
        activation_elements: the elements per sample of the model's largest activation at
            `input_size` (`ModelAnalysis.activation_elements`); 0 when unknown.
    """

    def __init__(
        self,
        stages: Mapping[bool, Sequence[nn.Module]],
        cut_points: Sequence[CutPoint],
        input_size: Sequence[int],
        num_classes: int,
        activation_elements: int = 0,
    ) -> None:
        super().__init__()
        if set(stages) != {False, True}:
            raise ValueError(f"Expected stages for both modes, got them for {sorted(stages)}.")
        for mode, chain in stages.items():
            if len(chain) != len(cut_points) + 1:
                raise ValueError(
                    f"Expected {len(cut_points) + 1} {'train' if mode else 'eval'}-mode stages "
                    f"for {len(cut_points)} cut points, got {len(chain)}."
                )
        self.cut_points = tuple(cut_points)
        self.input_size = tuple(input_size)
        self.num_classes = int(num_classes)
        self.activation_elements = int(activation_elements)
        # Plain attributes, not submodules: see the class docstring.
        self._stages = {mode: tuple(chain) for mode, chain in stages.items()}
        self._compiled: dict[bool, tuple[nn.Module, ...]] | None = None
        self._inference: tuple[nn.Module, ...] | None = None
        self._chained: tuple[nn.Module, ...] | None = None
        self._fold = True

    @property
    def fold_batchnorm(self) -> bool:
        """Whether `inference_stages` fold batch norms into convolutions and fuse the ReLUs
        and sums after them (default True)."""
        return self._fold

    @fold_batchnorm.setter
    def fold_batchnorm(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"Expected `fold_batchnorm` to be a bool, got {value!r}.")
        if value != self._fold:
            self._fold, self._inference, self._chained = value, None, None

    @property
    def names(self) -> list[str]:
        """The names of the cut points the stages are split at."""
        return [c.name for c in self.cut_points]

    def stages(self, training: bool | None = None) -> list[nn.Module]:
        """The stages of a mode (this module's own by default); compiled after `compile()`."""
        mode = self.training if training is None else bool(training)
        return list((self._compiled or self._stages)[mode])

    def inference_stages(self, chained: bool = False) -> list[nn.Module]:
        """The eval-mode stages for inference: norms folded, ReLUs and sums fused, in place.

        Where autograd is off, each conv → batch norm pair runs as one convolution with the
        norm folded into its weights (see `earlyexit.fx._fold`), and on CPU a 2-d
        convolution applies the ReLU and the residual sum after it as it writes its output
        (oneDNN post-ops, see `earlyexit.fx._pointwise`), unless `fold_batchnorm` is False;
        and ops overwrite
        temporaries that nothing reads again (`relu` after a norm, the sum that ends a
        residual block), which saves the allocator work and, on CPU, the page faults of fresh
        memory (see `earlyexit.fx._inplace`). The results are those of `stages(False)` up to
        float rounding; with autograd on they compute as those do. Compiled stages are
        returned as they are after `compile()`.

        Args:
            chained: stages for a caller that runs them one after another, each on the output
                of the one before or on a copy of some of its rows, and does not read a
                stage's input again once the stage has run (early-exit inference does so).
                From stage 1 on, a stage may then also overwrite its input, where the stage
                before returns a tensor of its own: the first residual block of a stage
                writes its sum into its shortcut, as the blocks after it do. Stage 0 never
                writes into its input. With False (the default), no stage does: each can run
                alone, on any input, any number of times.
        """
        if self._compiled is not None:
            return list(self._compiled[False])
        if self._inference is None or self._chained is None:
            chain = self._stages[False]
            if self._fold:  # and fuse: both round (or may) as the eval stages do not
                chain = tuple(fuse_pointwise(fold_stage(s)) for s in chain)
            self._inference = tuple(rewrite_inplace(s) for s in chain)
            self._chained = tuple(rewrite_chain(chain))
        return list(self._chained if chained else self._inference)

    def compile(self, **kwargs: Any) -> StagedGraph:  # type: ignore[override]
        """Compile every stage of both modes with `torch.compile` (keyword arguments pass on).

        The compiled stages share the parameters; `stages()` returns them from then on.
        """
        self._compiled = {
            mode: tuple(torch.compile(s, **kwargs) for s in chain)
            for mode, chain in self._stages.items()
        }
        return self

    def train(self, mode: bool = True) -> StagedGraph:
        """Set the mode, and have the inference stages fold their batch norms again.

        Whatever changed the weights in between (a fused optimizer, an edit through `.data`)
        is then seen, even where no version counter says so.
        """
        super().train(mode)
        for pair in folded_pairs(self._inference or ()):  # the chained stages share them
            pair.invalidate()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run every stage of the current mode: the model's own output."""
        for stage in self.stages():
            x = stage(x)
        return x

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        super()._apply(fn, recurse)
        # Their copies of the stages' tensors would be stale.
        self._inference = self._chained = None
        # The model's layers are the owner's to move; the stages' own tensors live on each
        # stage and on the empty modules that `fx.GraphModule` makes to hold their paths.
        for chain in self._stages.values():
            for stage in chain:
                for holder in _holders(stage):
                    holder._apply(fn, recurse=False)
        return self

    def extra_repr(self) -> str:
        n = len(self.cut_points) + 1
        return f"{n} stages in train and in eval mode, split after {self.names}"


def _holders(stage: nn.Module) -> list[nn.Module]:
    """A stage and the plain `nn.Module`s under it that hold paths to the model's tensors."""
    found, todo = [], [stage]
    while todo:
        module = todo.pop()
        found.append(module)
        todo.extend(m for m in module._modules.values() if type(m) is nn.Module)
    return found


def split_model(analysis: ModelAnalysis, names: Sequence[str]) -> StagedGraph:
    """Split both graphs of an analysed model after the named cut points.

    Args:
        analysis: the model, from `analyse_model`.
        names: names (or aliases) of cut points, in execution order.

    Returns:
        The stages, `len(names) + 1` per mode.

    Raises:
        TraceError: when a name is not a cut point of both graphs, or the names are out of
            order.
    """
    cut_points = []
    for name in names:
        cut = analysis.find(name)
        if cut is None:
            raise TraceError(
                f"No cut point named {name!r}. Hint: `earlyexit.profile(model).candidates` "
                "lists them."
            )
        cut_points.append(cut)
    canonical = [c.name for c in cut_points]
    stages = {
        False: split_graph(analysis.eval_graph, canonical),
        True: split_graph(analysis.train_graph, canonical),
    }
    return StagedGraph(
        stages,
        cut_points,
        analysis.input_size,
        analysis.num_classes,
        analysis.activation_elements,
    )


def split_graph(analysis: GraphAnalysis, names: Sequence[str]) -> list[fx.GraphModule]:
    """Split an analysed graph after the named cut points into `len(names) + 1` stages.

    Each stage takes one tensor and returns one; the stages share the traced module's
    parameters, and running them in order equals running the whole graph.

    Args:
        analysis: the graph.
        names: names (or aliases) of cut points, in execution order.

    Returns:
        The stages, as `GraphModule`s.

    Raises:
        TraceError: when a name is not a cut point of this graph, or the names are out of
            order.
    """
    gm = analysis.module
    nodes = list(gm.graph.nodes)
    mode = "train" if analysis.training else "eval"
    cuts = []
    for name in names:
        node = analysis.node(name)
        if node is None:
            raise TraceError(
                f"No node named {name!r} in the traced graph. Hint: "
                "`earlyexit.profile(model)` lists the cut points."
            )
        if node not in analysis.cuts:
            raise TraceError(
                f"{name!r} is not a cut point of the {mode}-mode graph: other values computed "
                "before it are still needed after it. Hint: choose a node from "
                "`earlyexit.profile(model).candidates`."
            )
        cuts.append(node)
    bounds = [analysis.order[c] for c in cuts]
    if bounds != sorted(set(bounds)):
        raise TraceError(
            f"Cut points {list(names)} are not in execution order or repeat. Hint: list them "
            "in the order of `earlyexit.profile(model).candidates`, each once."
        )
    starts = [0, *(b + 1 for b in bounds)]
    ends = [*(b + 1 for b in bounds), len(nodes)]
    stages = []
    for s, (start, end) in enumerate(zip(starts, ends)):
        builder = _StageBuilder(analysis, s, cuts[s - 1] if s else None)
        builder.copy(nodes[start:end])
        stage = builder.finish(cuts[s] if s < len(cuts) else None)
        stages.append(stage)
    return stages


class _StageBuilder:
    """Copies one stage's nodes into a graph of its own, with the stage's input as `x`.

    A value that an earlier stage computed from sizes alone is computed again here, from `x`.
    """

    def __init__(self, analysis: GraphAnalysis, index: int, after: fx.Node | None) -> None:
        self.analysis = analysis
        self.index = index
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.rebuilt: list[fx.Node] = []
        self.x: fx.Node | None = None
        if after is not None:
            self.x = self.graph.placeholder("x")
            self.env[after] = self.x

    def copy(self, nodes: Sequence[fx.Node]) -> None:
        """Copy the input-dependent nodes; the rest is copied where it is used."""
        derived, dependent = self.analysis.size_derived, self.analysis.dependent
        for node in nodes:
            if node.op == "output":
                self.graph.output(fx.map_arg(node.args[0], self.lookup))
            elif node in derived and is_size_source(node) and node.args[0] not in self.env:
                self.env[node] = self.rebuild(node)
            elif node in dependent:
                self.env[node] = self.graph.node_copy(node, self.lookup)
                if node in derived:
                    self.rebuilt.append(self.env[node])

    def lookup(self, n: fx.Node) -> Any:
        """The value of `n` in this stage: copied, rebuilt, or an error if it is a feature."""
        if n in self.env:
            return self.env[n]
        if n in self.analysis.size_derived:
            # A size (or a value computed from sizes) from an earlier stage.
            if is_size_source(n):
                self.env[n] = self.rebuild(n)
            else:
                self.env[n] = self.graph.node_copy(n, self.lookup)
            if isinstance(self.env[n], fx.Node):
                self.rebuilt.append(self.env[n])
        elif n in self.analysis.dependent:
            raise TraceError(
                f"Stage {self.index} needs {self.analysis.name(n)!r} from an earlier stage "
                "besides its input. Hint: choose exit points from "
                "`earlyexit.profile(model).candidates`."
            )
        else:
            # Input-independent values are rebuilt in each stage that needs them.
            self.env[n] = self.graph.node_copy(n, self.lookup)
        return self.env[n]

    def rebuild(self, source: fx.Node) -> Any:
        """The node (or constant) that gives a size source's value from this stage's input."""
        spec = self.analysis.sizes.get(source)
        if spec is None or self.x is None:
            raise TraceError(
                f"The size read at {self.analysis.name(source)!r} is needed in a later stage "
                "but could not be rebuilt there. Hint: choose other exit points from "
                "`earlyexit.profile(model).candidates`."
            )
        return spec.rebuild(self.graph, self.x)

    def finish(self, last: fx.Node | None) -> fx.GraphModule:
        """The stage, returning `last` (the model's own output when None)."""
        if last is not None:
            self.graph.output(self.env[last])
        # Sizes read here only for a later stage (which rebuilds them) are dead weight.
        for n in reversed(self.rebuilt):
            if not n.users and n.op in ("call_function", "call_method") and not has_effect(n):
                self.graph.erase_node(n)
        gm = self.analysis.module
        stage = fx.GraphModule(gm, self.graph, class_name=f"Stage{self.index}")
        stage.training = gm.training
        return stage
