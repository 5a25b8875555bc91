"""Exporting an early-exit network piece by piece: `torch.export` programs and ONNX files.

Early-exit inference has data-dependent control flow (how many samples continue after each
exit), which no single exported graph can hold. So each stage and each exit head is exported
on its own, with a dynamic batch axis, and a small runner does the compaction between them,
exactly as `EarlyExitNet.early_exit` does.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from earlyexit._modes import set_mode
from earlyexit.errors import EarlyExitError
from earlyexit.inference import check_threshold, run_early_exit
from earlyexit.model import EarlyExitNet
from earlyexit.outputs import EarlyExitResult

__all__ = ["ExportedEarlyExit", "export_onnx", "export_stages"]


class ExportedEarlyExit:
    """Early-exit inference from exported stages and heads.

    Built by `export_stages`. Calling it runs the same compaction loop as
    `EarlyExitNet.early_exit`, on the exported programs' modules.

    Attributes:
        stages: the N+1 `torch.export.ExportedProgram`s of the stages (eval mode).
        heads: the N `ExportedProgram`s of the exit heads, each returning
            `(class_logits, confidence_logit)`.
        exit_costs: the N+1 relative costs.
        threshold: the default T.
        num_classes: the number of classes.
        exit_names: the cut point after which each exit sits.
    """

    def __init__(
        self,
        stages: Sequence[torch.export.ExportedProgram],
        heads: Sequence[torch.export.ExportedProgram],
        exit_costs: torch.Tensor,
        threshold: float,
        num_classes: int,
        exit_names: Sequence[str] = (),
    ) -> None:
        if len(stages) != len(heads) + 1:
            raise ValueError(
                f"Expected one more stage than heads, got {len(stages)} stages and "
                f"{len(heads)} heads."
            )
        self.stages = list(stages)
        self.heads = list(heads)
        self.exit_costs = exit_costs.detach().clone()
        self.threshold = check_threshold(threshold)
        self.num_classes = int(num_classes)
        self.exit_names = list(exit_names)
        self._stage_modules = [ep.module() for ep in self.stages]
        self._head_modules = [ep.module() for ep in self.heads]

    @property
    def num_exits(self) -> int:
        """N, the number of early exits."""
        return len(self.heads)

    def __call__(self, x: torch.Tensor, threshold: float | None = None) -> EarlyExitResult:
        """Early-exit inference, as `EarlyExitNet.early_exit`, on whole batches.

        Exported programs do not run CPU micro-batches (`EarlyExitNet.micro_batch`); the
        results are the same.

        Args:
            x: the input batch.
            threshold: T for this call; `self.threshold` when None.

        Returns:
            `EarlyExitResult(logits, exit_index, cost)`.
        """
        t = self.threshold if threshold is None else check_threshold(threshold)
        with torch.no_grad():
            return run_early_exit(
                self._stage_modules, self._head_modules, x, t, self.exit_costs, self.num_classes
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_exits={self.num_exits}, exit_names={self.exit_names}, "
            f"threshold={self.threshold})"
        )


def _stage_inputs(net: EarlyExitNet, example: torch.Tensor) -> list[torch.Tensor]:
    """The input of every stage, then the final output, for an example batch."""
    feats, x = [], example
    with torch.no_grad():
        for stage in net.stages(training=False):
            feats.append(x)
            x = stage(x)
    return feats


def _example_batch(net: EarlyExitNet, example: torch.Tensor) -> torch.Tensor:
    if not isinstance(example, torch.Tensor):
        raise TypeError(f"Expected `example` to be a tensor, got {type(example).__name__}.")
    if example.ndim < 2 or example.shape[0] < 1:
        raise ValueError(
            f"Expected `example` to be a batch (B, *input_size), got shape "
            f"{tuple(example.shape)}. Hint: `torch.randn(2, *net.input_size)`."
        )
    if example.shape[0] < 2:
        # A batch of one would make torch.export specialise the batch axis to 1.
        example = example.expand(2, *example.shape[1:]).clone()
    return example


class _HeadOutputs(nn.Module):
    """A head as a plain module returning a tuple: what exporters expect."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, a = self.head(x)
        return z, a


class _Piece(NamedTuple):
    """One module to export on its own: a stage or an exit head, with an example input."""

    kind: str  # "stage" or "head"
    index: int
    module: nn.Module
    example: torch.Tensor

    @property
    def name(self) -> str:
        """`stage 0`, `head 0`, ...: how errors name the piece."""
        return f"{self.kind} {self.index}"


@contextlib.contextmanager
def _eval_pieces(net: EarlyExitNet, example: torch.Tensor) -> Iterator[list[_Piece]]:
    """The eval-mode stages and heads in execution order, the net in eval mode meanwhile.

    Afterwards every submodule has its own mode back.
    """
    with set_mode(net, False):
        inputs = _stage_inputs(net, example)
        pieces = []
        for i, stage in enumerate(net.stages(training=False)):
            pieces.append(_Piece("stage", i, stage, inputs[i]))
            if i < net.num_exits:
                pieces.append(_Piece("head", i, _HeadOutputs(net.heads[i]), inputs[i + 1]))
        yield pieces


def export_stages(net: EarlyExitNet, example: torch.Tensor) -> ExportedEarlyExit:
    """Export each stage and exit head with `torch.export`, with a dynamic batch axis.

    The eval-mode stages are exported (BatchNorm uses its running statistics). The net is
    not changed.

    Args:
        net: the early-exit network.
        example: an input batch (any batch size; its other axes fix the exported shapes).

    Returns:
        An `ExportedEarlyExit` whose call reproduces `net.early_exit`.

    Raises:
        EarlyExitError: when a stage or head cannot be exported.

    Example:
        >>> import timm, torch, earlyexit
        >>> from earlyexit.export import export_stages
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2).eval()
        >>> runner = export_stages(net, torch.randn(2, 3, 32, 32))
        >>> runner(torch.randn(5, 3, 32, 32)).exit_index.shape
        torch.Size([5])
    """
    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")
    example = _example_batch(net, example)
    device = net.exit_costs.device
    source = net
    if device.type != "cpu":
        # On CUDA, convolutions add guards on the batch size (cuDNN's 65535 limit, and 2 as
        # the lowest size seen) that a batch axis reaching down to one sample cannot meet. The
        # graph is the same on every device: export a CPU copy, then move the programs.
        source = copy.deepcopy(net).cpu()
        example = example.cpu()
    batch = torch.export.Dim("batch", min=1)
    programs: dict[str, list[torch.export.ExportedProgram]] = {"stage": [], "head": []}
    with _eval_pieces(source, example) as pieces:
        for piece in pieces:
            program = _export(piece.module, piece.example, batch, piece.name)
            if device.type != "cpu":
                program = _to_device(program, device)
            programs[piece.kind].append(program)
    return ExportedEarlyExit(
        programs["stage"],
        programs["head"],
        net.exit_costs,
        net.threshold,
        net.num_classes,
        net.exit_names,
    )


def _to_device(
    program: torch.export.ExportedProgram, device: torch.device
) -> torch.export.ExportedProgram:
    try:
        from torch.export.passes import move_to_device_pass
    except ImportError as err:
        raise EarlyExitError(
            f"Moving exported programs to {device} needs torch >= 2.6 "
            f"(torch.export.passes.move_to_device_pass), this is torch {torch.__version__}. "
            "Hint: export the net on the CPU and run the runner there, or upgrade torch."
        ) from err
    return move_to_device_pass(program, device)


def _export(
    module: nn.Module, x: torch.Tensor, batch: Any, what: str
) -> torch.export.ExportedProgram:
    try:
        return torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as err:
        raise EarlyExitError(
            f"torch.export failed on {what} ({type(err).__name__}: {err}). Hint: the backbone "
            "has an op torch.export cannot capture with a dynamic batch axis; try a fixed "
            "batch with `torch.export` yourself, or ONNX."
        ) from err


def export_onnx(net: EarlyExitNet, directory: str | os.PathLike[str]) -> list[str]:
    """Write each stage and exit head as an ONNX file, plus the exit metadata as JSON.

    Writes `stage_{i}.onnx` (input `x`, output `y`), `head_{i}.onnx` (input `x`, outputs
    `logits` and `confidence`) with a dynamic `batch` axis, and `earlyexit.json` with the
    exit costs, threshold, number of classes and exit names. A runtime reproduces early-exit
    inference by running stage i, then head i, and passing on only the samples with
    sigmoid(confidence) < threshold. Uses the torch.export-based exporter when `onnxscript` is
    installed and the TorchScript-based one otherwise.

    Args:
        net: the early-exit network (exported in eval mode, not changed).
        directory: where to write; created if missing.

    Returns:
        The paths written.

    Raises:
        ImportError: when `onnx` is not installed (`pip install earlyexit[onnx]`).
        EarlyExitError: when a piece cannot be exported.

    Example:
        >>> import os, tempfile, timm, earlyexit
        >>> from earlyexit.export import export_onnx
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2)
        >>> sorted(os.path.basename(p) for p in export_onnx(net, tempfile.mkdtemp()))[:2]
        ['earlyexit.json', 'head_0.onnx']
    """
    if importlib.util.find_spec("onnx") is None:
        raise ImportError("export_onnx needs onnx. Hint: `pip install earlyexit[onnx]`.")
    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    dynamo = importlib.util.find_spec("onnxscript") is not None
    param = next(iter(net.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    example = torch.zeros(2, *net.input_size, device=device)
    paths = []
    with _eval_pieces(net, example) as pieces:
        for piece in pieces:
            path = os.path.join(directory, f"{piece.kind}_{piece.index}.onnx")
            outputs = _ONNX_OUTPUTS[piece.kind]
            _to_onnx(piece.module, piece.example, path, outputs, dynamo, piece.name)
            paths.append(path)
    meta = {
        "num_exits": net.num_exits,
        "num_classes": net.num_classes,
        "input_size": list(net.input_size),
        "exit_names": net.exit_names,
        "exit_costs": [float(c) for c in net.exit_costs.tolist()],
        "threshold": net.threshold,
        "rule": "a sample leaves at exit i when sigmoid(confidence_i) >= threshold",
    }
    path = os.path.join(directory, "earlyexit.json")
    with open(path, "w") as f:
        json.dump(meta, f, indent=2)
    paths.append(path)
    return paths


#: The output names of each kind of piece in the ONNX files.
_ONNX_OUTPUTS = {"stage": ["y"], "head": ["logits", "confidence"]}


@contextlib.contextmanager
def _no_warnings() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _to_onnx(
    module: nn.Module, x: torch.Tensor, path: str, outputs: list[str], dynamo: bool, what: str
) -> None:
    try:
        if dynamo:
            axes: dict[str, Any] = {"dynamic_shapes": ({0: torch.export.Dim("batch", min=1)},)}
        else:
            axes = {"dynamic_axes": {name: {0: "batch"} for name in ["x", *outputs]}}
        # Only the TorchScript-based exporter's (many) warnings are silenced.
        with contextlib.nullcontext() if dynamo else _no_warnings():
            torch.onnx.export(
                module,
                (x,),
                path,
                input_names=["x"],
                output_names=outputs,
                dynamo=dynamo,
                **axes,
            )
    except Exception as err:
        raise EarlyExitError(
            f"ONNX export failed on {what} ({type(err).__name__}: {err}). Hint: use "
            "`export_stages` (torch.export), or simplify the backbone's unusual ops."
        ) from err
