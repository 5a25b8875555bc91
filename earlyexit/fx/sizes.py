"""Sizes read from features, and how a later stage rebuilds them from its own input.

A model may read a size from a feature (`B, C, H, W = x.shape`) and use it, or a value computed
from sizes alone (`cls_token.expand(B, -1, -1)`, a position embedding for the token grid), much
later. Such values don't hide cut points: a stage that needs one rebuilds it from the batch size
of its own input, which early-exit inference shrinks, and from the traced input size.

Each size a later stage may need is recorded at batch 2 and 3, which gives it as a `SizeSpec`:
every integer is `k * batch + m`, a device comes from the stage's input, and so does a floating
dtype (so that `net.half()` keeps working).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata

from earlyexit._modes import set_mode
from earlyexit.errors import TraceError
from earlyexit.fx._ops import is_size_source

__all__ = ["Recording", "SizeSpec", "record", "record_size_specs"]


@dataclass(frozen=True)
class SizeSpec:
    """How a stage rebuilds a value that an earlier stage read from a feature's metadata.

    Attributes:
        kind: `int` (one integer), `size` (a `torch.Size`), `device` or `dtype`.
        dims: `(k, m)` of the integer (`int`) or of each dimension (`size`): the value is
            `k * batch + m` for the stage's own batch size.
        dtype: the traced dtype (`dtype`); a floating one is taken from the stage's input.
    """

    kind: Literal["int", "size", "device", "dtype"]
    dims: tuple[tuple[int, int], ...] = ()
    dtype: torch.dtype | None = None

    @classmethod
    def from_values(cls, small: Any, large: Any) -> SizeSpec | None:
        """The spec of a value read at batch 2 (`small`) and 3 (`large`); None if it has none.

        Example:
            >>> SizeSpec.from_values(torch.Size([2, 16, 8]), torch.Size([3, 16, 8])).dims
            ((1, 0), (0, 16), (0, 8))
            >>> SizeSpec.from_values(64, 96)
            SizeSpec(kind='int', dims=((32, 0),), dtype=None)
        """

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if is_int(small) and is_int(large):
            return cls("int", ((large - small, 3 * small - 2 * large),))
        if (
            isinstance(small, tuple)
            and isinstance(large, tuple)
            and len(small) == len(large)
            and all(is_int(a) and is_int(b) for a, b in zip(small, large))
        ):
            return cls("size", tuple((b - a, 3 * a - 2 * b) for a, b in zip(small, large)))
        if isinstance(small, torch.device):
            return cls("device")
        if isinstance(small, torch.dtype):
            return cls("dtype", dtype=small)
        return None

    def rebuild(self, graph: fx.Graph, x: fx.Node) -> Any:
        """The node (or constant) that gives the value in `graph`, whose input is `x`."""
        if self.kind == "int":
            ((k, m),) = self.dims
            return m if k == 0 else graph.call_function(_rebuilt_int, (x, k, m))
        if self.kind == "size":
            return graph.call_function(_rebuilt_size, (x, self.dims))
        if self.kind == "device" or (self.dtype is not None and self.dtype.is_floating_point):
            return graph.call_function(getattr, (x, self.kind))
        return self.dtype


def _rebuilt_size(x: torch.Tensor, dims: tuple[tuple[int, int], ...]) -> torch.Size:
    """A size read in an earlier stage, rebuilt from this stage's batch size."""
    batch = x.shape[0]
    return torch.Size(k * batch + m for k, m in dims)


def _rebuilt_int(x: torch.Tensor, k: int, m: int) -> int:
    """An integer read from a size in an earlier stage, rebuilt from this stage's batch size."""
    return k * x.shape[0] + m


@dataclass(frozen=True, eq=False)
class Recording:
    """What one run of a graph saw.

    Attributes:
        output: the graph's output.
        tensors: the metadata (shape, dtype, ...) of every tensor-valued node, when asked for.
        sizes: the value of every size source (`x.shape`, `x.size(1)`, `x.device`, ...).
    """

    output: Any
    tensors: Mapping[fx.Node, TensorMetadata]
    sizes: Mapping[fx.Node, Any]


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, tensors: bool) -> None:
        super().__init__(gm)
        self.record_tensors = tensors
        self.tensors: dict[fx.Node, TensorMetadata] = {}
        self.sizes: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            if self.record_tensors:
                self.tensors[n] = _extract_tensor_metadata(result)
        elif is_size_source(n):
            self.sizes[n] = result
        return result


def record(gm: fx.GraphModule, example: torch.Tensor, tensors: bool) -> Recording:
    """Run `gm` in eval mode without gradients or RNG side effects, recording what it sees."""
    devices = [example.device] if example.device.type == "cuda" else []
    recorder = _Recorder(gm, tensors)
    with set_mode(gm, False), torch.no_grad(), torch.random.fork_rng(devices=devices):
        output = recorder.run(example)
    return Recording(output, recorder.tensors, recorder.sizes)


def record_size_specs(
    gm: fx.GraphModule,
    sources: Collection[fx.Node],
    example: Callable[[int], torch.Tensor],
    at_batch_2: Recording | None,
    model_name: str,
) -> dict[fx.Node, SizeSpec | None]:
    """Record how to rebuild each size source that a later stage may need.

    Args:
        gm: the traced graph.
        sources: the size sources whose values cross a cut point.
        example: an input batch of a given size.
        at_batch_2: a recording of `gm` at batch 2 already made, if any.
        model_name: how errors name the model.

    Returns:
        Each source's spec, None where the value cannot be rebuilt.

    Raises:
        TraceError: when the graph fails on a batch of another size.
    """
    if not sources:
        return {}
    # Running the train-mode graph may update buffers (batch norm with `training=True` baked
    # in by the trace); the model must come out of tracing unchanged.
    saved = [(b, b.detach().clone()) for b in gm.buffers()]
    try:
        small = at_batch_2 if at_batch_2 is not None else record(gm, example(2), tensors=False)
        large = record(gm, example(3), tensors=False)
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
    return {
        node: SizeSpec.from_values(small.sizes.get(node), large.sizes.get(node)) for node in sources
    }
