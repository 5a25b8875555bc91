"""MAC profiles with fvcore.

One unit throughout: a MAC is one multiply-add, what fvcore calls a FLOP. All counts are for one
sample. fvcore is imported lazily, when a profile is first taken, because importing it warns.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from earlyexit.errors import TraceError
from earlyexit.fx.analysis import ModelAnalysis, analyse_model
from earlyexit.fx.split import split_graph

__all__ = ["Candidate", "FlopProfile", "count_macs", "profile", "resolve_input_size"]


@dataclass(frozen=True)
class Candidate:
    """A candidate exit point.

    Attributes:
        name: dotted qualified name of the graph node the exit would sit after.
        shape: feature shape for one sample, without the batch axis.
        channel_axis: axis of the batched feature that holds the channels.
        cumulative_macs: MACs of the model from the input up to and including this node.
        fraction: `cumulative_macs` divided by the whole model's MACs.
        aliases: the node's other names (the other modules whose output it is), each
            accepted wherever exit names are passed in.
    """

    name: str
    shape: tuple[int, ...]
    channel_axis: int
    cumulative_macs: int
    fraction: float
    aliases: tuple[str, ...] = ()


@dataclass
class FlopProfile:
    """Where a model's MACs go.

    Attributes:
        total_macs: MACs of the whole model for one sample.
        candidates: every candidate exit point, in execution order.
        input_size: the `(C, H, W)` the profile was taken at.
        num_classes: the size of the model's output.
        analysis: the traced and analysed model the profile was taken from.
    """

    total_macs: int
    candidates: list[Candidate]
    input_size: tuple[int, ...]
    num_classes: int
    analysis: ModelAnalysis | None = field(default=None, repr=False, compare=False)

    def names(self) -> list[str]:
        """The candidates' qualified names, in order."""
        return [c.name for c in self.candidates]

    def __str__(self) -> str:
        lines = [
            f"{'#':>4}  {'cut point':<40} {'shape':<18} {'MMACs':>10} {'fraction':>8}",
        ]
        for i, c in enumerate(self.candidates):
            shape = "x".join(str(s) for s in c.shape)
            lines.append(
                f"{i:>4}  {c.name:<40} {shape:<18} {c.cumulative_macs / 1e6:>10.3f} "
                f"{c.fraction:>8.4f}"
            )
        lines.append(f"total: {self.total_macs / 1e6:.3f} MMACs per sample")
        return "\n".join(lines)


def count_macs(module: nn.Module, inputs: torch.Tensor | tuple[torch.Tensor, ...]) -> int:
    """MACs of one call of `module` on `inputs`, counted by fvcore, quietly.

    Args:
        module: the module to run.
        inputs: its input tensor(s), usually with batch size 1.

    Returns:
        The MAC count of that call.
    """
    return int(_analysis(module, inputs).total())


def _analysis(module: nn.Module, inputs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        logging.getLogger("fvcore").setLevel(logging.ERROR)
        analysis = FlopCountAnalysis(module, inputs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        was_training = {m: m.training for m in module.modules()}
        module.eval()
        try:
            with torch.no_grad():
                analysis.total()
        except Exception as err:
            raise TraceError(
                f"fvcore could not count the MACs of {type(module).__name__} "
                f"({type(err).__name__}: {err}). Hint: the model must run under torch.jit.trace."
            ) from err
        finally:
            for m, flag in was_training.items():
                m.training = flag
    return analysis


def segment_macs(segments: Sequence[nn.Module], example: torch.Tensor) -> list[int]:
    """MACs of each of a chain of modules, from one fvcore analysis of the whole chain.

    Args:
        segments: modules that run one after another, each taking the previous one's output.
        example: the chain's input, batch size 1.

    Returns:
        One MAC count per segment.
    """
    chain = nn.Sequential(*segments)
    by_module = _analysis(chain, example).by_module()
    return [int(by_module.get(str(i), 0)) for i in range(len(segments))]


def resolve_input_size(model: nn.Module, input_size: Sequence[int] | None) -> tuple[int, int, int]:
    """The `(C, H, W)` to trace a model at: the argument, else the model's timm config.

    Raises:
        ValueError: when the size is malformed or cannot be found.
    """
    if input_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
        input_size = (cfg or {}).get("input_size")
        if input_size is None:
            raise ValueError(
                f"{type(model).__name__} does not say its input size. Hint: pass "
                "`input_size=(C, H, W)`, e.g. `input_size=(3, 224, 224)`."
            )
    if (
        not isinstance(input_size, Sequence)
        or isinstance(input_size, str)
        or len(input_size) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in input_size)
    ):
        raise ValueError(
            f"Expected `input_size` to be (C, H, W), three positive ints, got {input_size!r}. "
            "Hint: leave out the batch axis, e.g. `input_size=(3, 32, 32)`."
        )
    return tuple(input_size)  # type: ignore[return-value]


def profile_analysis(analysis: ModelAnalysis) -> FlopProfile:
    """Profile an analysed model: one fvcore pass over the graph split at every cut point."""
    names = [c.name for c in analysis.cut_points]
    segments = split_graph(analysis.eval_graph, names)
    param = next(iter(analysis.eval_graph.module.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    example = torch.zeros(1, *analysis.input_size, device=device, dtype=dtype)
    macs = segment_macs(segments, example)
    total = sum(macs)
    if total <= 0:
        raise TraceError(
            "fvcore counted no MACs in the model. Hint: the model must contain convolutions, "
            "linear layers or matrix products that fvcore can count."
        )
    candidates: list[Candidate] = []
    cumulative = 0
    for cut, seg in zip(analysis.cut_points, macs):
        cumulative += seg
        if seg == 0 and candidates:
            # No MAC-bearing op since the previous cut point: one candidate, the later one.
            candidates.pop()
        if cumulative == 0 or cumulative >= total:
            # Before any MAC, or with none left after it (past the model's own classifier):
            # an exit there costs what the final exit does.
            continue
        candidates.append(
            Candidate(
                cut.name, cut.shape, cut.channel_axis, cumulative, cumulative / total, cut.aliases
            )
        )
    return FlopProfile(total, candidates, analysis.input_size, analysis.num_classes, analysis)


def profile(model: nn.Module, input_size: Sequence[int] | None = None) -> FlopProfile:
    """Trace a model and measure the MACs up to every candidate exit point.

    Args:
        model: a classifier (timm, torchvision or any traceable `nn.Module`). It is not changed.
        input_size: `(C, H, W)`; taken from `model.pretrained_cfg["input_size"]` when omitted.

    Returns:
        The model's `FlopProfile`.

    Raises:
        ValueError: when `input_size` is malformed or missing.
        TraceError: when the model cannot be traced or profiled.

    Example:
        >>> import timm, earlyexit
        >>> prof = earlyexit.profile(timm.create_model("resnet20"))
        >>> round(prof.total_macs / 1e6, 1), prof.names()[2:5]
        (40.9, ['layer1.0', 'layer1.1', 'layer1.2'])
        >>> prof.candidates[4].aliases  # the layer that closes the block, the stage it ends
        ('layer1.2.act2', 'layer1')
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, got {type(model).__name__}.")
    size = resolve_input_size(model, input_size)
    return profile_analysis(analyse_model(model, size))
