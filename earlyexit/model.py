"""`EarlyExitNet` and `convert()`, the library's entry point."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from earlyexit._head_folding import InferenceHead, inference_heads
from earlyexit._pipeline import run_micro_batches
from earlyexit.config import EarlyExitConfig
from earlyexit.errors import EarlyExitWarning, PlacementError, TraceError
from earlyexit.flops import FlopProfile, count_macs, profile_analysis, resolve_input_size
from earlyexit.fx.analysis import analyse_model, find_by_name
from earlyexit.fx.split import StagedGraph, split_model
from earlyexit.heads import ExitHead
from earlyexit.inference import check_inputs, check_threshold, run_early_exit
from earlyexit.outputs import EarlyExitResult, ExitOutputs
from earlyexit.placement import distribution_targets, fit_exits

__all__ = ["MICRO_BATCH_BYTES", "EarlyExitConfig", "EarlyExitNet", "convert"]

#: With `micro_batch="auto"`, CPU inference runs each stage on as many samples as keep the
#: model's largest activation within this many bytes (and at least `MIN_MICRO_BATCH`).
MICRO_BATCH_BYTES = 4 * 2**20
#: The smallest automatic micro-batch: fewer samples starve the matrix products of the late,
#: low-resolution layers (a 7×7 feature map is 49 rows per sample).
MIN_MICRO_BATCH = 4


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times `scale` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class EarlyExitNet(nn.Module):
    """A model with early exits: N exit heads along the backbone, the backbone's own head last.

    Build one with `earlyexit.convert`, or `earlyexit.load` from a file; both end in this
    constructor. In train mode `net(x)` returns `ExitOutputs` for `EENetLoss`; in eval mode it
    returns the `(B, num_classes)` logits of early-exit inference.

    Args:
        backbone: the original model; the stages share its parameters. The net takes its mode.
        staged: the backbone split into N+1 stages, in both modes, at the exits' cut points.
        heads: the N exit heads, one per cut point of `staged`, in order; they are moved to
            the backbone's device and dtype.
        config: the resolved config: its `exit_names` are the cut points of `staged`.
        stage_macs: MACs of each of the N+1 stages, for one sample.
        head_macs: MACs of each exit head, for one sample.

    Raises:
        ValueError: when the pieces do not fit together.

    Attributes:
        backbone: the original model.
        heads: the N exit heads.
        staged: the N+1 stages of each mode (`stages()` gives them).
        config: the resolved `EarlyExitConfig` (with `exit_names` and `input_size`).
        exit_costs: `(N+1,)` relative costs c_0 < ... < c_N.
        stage_macs: MACs of each of the N+1 stages, for one sample.
        head_macs: MACs of each exit head, for one sample.
        backbone_macs: MACs of the original model, for one sample.
    """

    # A class default too: a net pickled before the setting existed unpickles with it.
    _micro_batch: int | Literal["auto"] | None = None

    def __init__(
        self,
        backbone: nn.Module,
        staged: StagedGraph,
        heads: Sequence[ExitHead],
        config: EarlyExitConfig,
        *,
        stage_macs: Sequence[int],
        head_macs: Sequence[int],
    ) -> None:
        super().__init__()
        heads = list(heads)
        n = len(staged.cut_points)
        if config.exit_names != staged.names or len(heads) != n:
            raise ValueError(
                f"Expected {n} exit heads and `config.exit_names` {staged.names}, as the stages "
                f"are split, got {len(heads)} heads and {config.exit_names}."
            )
        if tuple(config.input_size or ()) != staged.input_size:
            raise ValueError(
                f"Expected `config.input_size` {staged.input_size}, the size the stages were "
                f"traced at, got {config.input_size}."
            )
        if len(stage_macs) != n + 1 or len(head_macs) != n or sum(stage_macs) <= 0:
            raise ValueError(
                f"Expected MAC counts of {n + 1} stages and {n} heads, got "
                f"stage_macs={list(stage_macs)}, head_macs={list(head_macs)}."
            )
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.staged = staged
        self.config = config
        self.num_classes = staged.num_classes
        self.stage_macs = [int(m) for m in stage_macs]
        self.head_macs = [int(m) for m in head_macs]
        self.backbone_macs = sum(self.stage_macs)
        costs, total = [], 0
        for i, macs in enumerate(self.stage_macs):
            total += macs + (self.head_macs[i] if i < len(self.head_macs) else 0)
            costs.append(total / self.backbone_macs)
        self.register_buffer("exit_costs", torch.tensor(costs), persistent=False)
        self._compiled_heads: list[nn.Module] | None = None
        self._folded_heads: list[nn.Module] | None = None  # see `_inference_heads`
        param = next(iter(backbone.parameters()), None)
        if param is not None:
            self.heads.to(device=param.device, dtype=param.dtype)
        # Take the backbone's mode without touching its modules' own flags.
        self.heads.train(backbone.training)
        self.training = self.staged.training = backbone.training

    @property
    def num_exits(self) -> int:
        """N, the number of early exits."""
        return len(self.heads)

    @property
    def exit_names(self) -> list[str]:
        """The cut point each early exit sits after: the innermost module whose output it is.

        For example `layer1.2`, a block of resnet20; `earlyexit.profile(model).candidates`
        lists each cut point's aliases (`layer1`), which are accepted wherever names are
        passed in.
        """
        return list(self.config.exit_names or [])

    @property
    def input_size(self) -> tuple[int, ...]:
        """The `(C, H, W)` the model was converted at."""
        return tuple(self.config.input_size or ())

    @property
    def fold_batchnorm(self) -> bool:
        """Whether early-exit inference folds batch norms into the convolutions before them.

        True by default: each `Conv → BatchNorm` pair of the backbone runs as one convolution
        in `early_exit`, `predict` and the CUDA-graph runner, which saves a pass over the
        activation (about 15 % of a CIFAR ResNet's CPU time). The results then equal
        `forward_all`'s, and the original model's, up to float rounding (about 1e-6
        relative), and the folded weights are a second copy of the convolutions' weights.
        They are made again when a weight, statistic or `eps` changes in a way PyTorch tracks,
        and at every `net.eval()` / `net.train()`; after an in-place edit through `.data`,
        which no version counter sees, call `net.eval()`. With it, on CPU, large float32
        convolutions also do the ReLU and residual sum after them (oneDNN post-ops; see
        *Inference* in the docs), which keeps the values but turns a NaN through such a
        ReLU into 0. The channels-first `conv` exit heads are folded too (their batch norm,
        layout pool and linear branches; see *Inference* in the docs). Set it to False for
        inference that is the original model bit for bit (with early exits off); training,
        `forward_all` and export never fold.
        """
        return self.staged.fold_batchnorm

    @fold_batchnorm.setter
    def fold_batchnorm(self, value: bool) -> None:
        self.staged.fold_batchnorm = value

    @property
    def micro_batch(self) -> int | Literal["auto"] | None:
        """How many samples early-exit inference on the CPU runs through a stage at a time.

        None (the default): the whole batch. An int, or `"auto"`: on the CPU, `early_exit`
        (and `net(x)` in eval mode) and `predict` run a batch larger than this through the
        stages that many samples at a time, with the refill queues of `predict`: the
        samples that stay after an exit wait for the next stage until a full micro-batch is
        there. Each sample's result is the one it gets alone, as always. CUDA devices always
        run whole batches.

        Smaller batches keep the activations in the CPU's caches, which can make a large batch
        much faster: in a process that had run whole batches before, ResNet-110 at batch 256
        ran 1.3× as fast or more on micro-batches of 64. Whether it pays depends on the
        allocator, though. glibc's hands a freed block back to the system, to be
        page-faulted in again, once the free memory at the top of its heap exceeds twice the
        largest block freed so far; in a process that only ever runs micro-batches that
        limit stays low, and there micro-batches were no faster than whole batches (7-11 %
        slower, or within 3 %, in two sets of `benchmarks/fresh.py`). With an allocator that
        keeps freed memory (jemalloc, tcmalloc, or glibc with `MALLOC_TRIM_THRESHOLD_` set),
        or in a process that has already freed larger blocks, they pay. The docs' speed page
        has the numbers.

        `"auto"`: as many samples as keep the model's largest activation within
        `MICRO_BATCH_BYTES` (4 MiB), and at least 4, from the sizes seen at conversion, scaled
        to the input's size and to the dtype the run computes in (autocast's where it is on,
        else the input's): 64 for a CIFAR ResNet at 32×32 in float32, 128 under bfloat16
        autocast, 4 for timm's `resnet50` and `deit_small_patch16_224` at 224×224.

        Raises:
            TypeError, ValueError: on assignment, for anything but "auto", None or a positive
                int.
        """
        return self._micro_batch

    @micro_batch.setter
    def micro_batch(self, value: int | Literal["auto"] | None) -> None:
        if value is None or value == "auto":
            self._micro_batch = value
            return
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(
                f'Expected `micro_batch` to be a positive int, "auto" or None, got {value!r}. '
                'Hint: "auto" sizes it from the model\'s activations; None runs whole batches.'
            )
        if value < 1:
            raise ValueError(
                f'Expected `micro_batch` to be a positive int, "auto" or None, got {value!r}. '
                "Hint: None runs whole batches."
            )
        self._micro_batch = value

    def _any_module_training(self) -> bool:
        return any(m.training for m in self.modules())

    def resolve_micro_batch(self, x: torch.Tensor) -> int | None:
        """The micro-batch CPU inference uses for inputs like `x`; None: whole batches.

        See `micro_batch`. None on any device but the CPU, and with `micro_batch=None`.
        """
        if x.device.type != "cpu" or self._micro_batch is None:
            return None
        if self._micro_batch != "auto":
            return int(self._micro_batch)
        per_sample = self.staged.activation_elements
        traced = math.prod(self.input_size)
        if per_sample <= 0 or traced <= 0 or x.ndim < 1:
            return None
        # The activations' dtype: autocast's where it is on, else the input's.
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        else:
            dtype = x.dtype if x.is_floating_point() else torch.float32
        per_sample *= dtype.itemsize * math.prod(x.shape[1:]) / traced
        return max(MIN_MICRO_BATCH, int(MICRO_BATCH_BYTES // max(per_sample, 1.0)))

    @property
    def threshold(self) -> float:
        """T: a sample leaves at exit i when h_i >= T (values above 1: never early)."""
        return self.config.threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self.config.threshold = check_threshold(value)

    def stages(self, training: bool | None = None) -> list[nn.Module]:
        """The N+1 stages for a mode (the current one by default); compiled after `compile()`."""
        return self.staged.stages(self.training if training is None else training)

    def _inference_stages(self, chained: bool = False) -> list[nn.Module]:
        """The stages early-exit inference runs: in eval mode, those that work in place
        (`chained`: from stage 1 on, also into their input, see `StagedGraph.inference_stages`).
        """
        return self.stages() if self.training else self.staged.inference_stages(chained)

    def compile(self, **kwargs: Any) -> EarlyExitNet:  # type: ignore[override]
        """Compile each stage and head with `torch.compile` (keyword arguments pass through).

        Early-exit inference then runs the compiled pieces; the parameters stay shared.
        """
        dynamic = kwargs.pop("dynamic", True)
        self.staged.compile(dynamic=dynamic, **kwargs)
        self._compiled_heads = [torch.compile(h, dynamic=dynamic, **kwargs) for h in self.heads]
        return self

    def _exit_heads(self) -> list[nn.Module]:
        """The N exit heads, compiled after `compile()`."""
        if self._compiled_heads is not None:
            return self._compiled_heads
        return list(self.heads)

    def _inference_heads(self) -> list[nn.Module]:
        """The heads early-exit inference runs: in eval mode with `fold_batchnorm`, each
        channels-first `conv` head folded (`earlyexit._head_folding`); else `_exit_heads()`."""
        if self._compiled_heads is not None or self.training or not self.fold_batchnorm:
            return self._exit_heads()
        wrapped = self._folded_heads
        if (
            wrapped is None
            or len(wrapped) != len(self.heads)
            or any(getattr(w, "head", w) is not h for w, h in zip(wrapped, self.heads))
        ):
            wrapped = self._folded_heads = inference_heads(self.heads)
        return list(wrapped)

    def train(self, mode: bool = True) -> EarlyExitNet:
        """Set the mode; the folded heads fold again at their next use, as the stages do.

        Whatever changed the weights in between (an edit through `.data`) is then seen.
        """
        super().train(mode)
        for head in self._folded_heads or ():
            if isinstance(head, InferenceHead):
                head.invalidate()
        return self

    def forward_all(self, x: torch.Tensor) -> ExitOutputs:
        """Run every sample through every exit, whatever the mode.

        Returns:
            `ExitOutputs` with N+1 class logits, N confidence logits and `exit_costs`.
        """
        stages = self.stages()
        logits, confidence = [], []
        scale = self.config.grad_scale
        for stage, head in zip(stages, self._exit_heads()):
            x = stage(x)
            z, a = head(_ScaleGrad.apply(x, scale) if scale != 1.0 and x.requires_grad else x)
            logits.append(z)
            confidence.append(a)
        logits.append(stages[-1](x))
        return ExitOutputs(logits=logits, confidence_logits=confidence, costs=self.exit_costs)

    def early_exit(self, x: torch.Tensor, threshold: float | None = None) -> EarlyExitResult:
        """Early-exit inference: each sample stops at the first exit with h_i >= threshold.

        Stage 0 runs on the batch, and after each exit only the samples that stay go on. On
        the CPU, a batch larger than `micro_batch` runs through the stages that many samples
        at a time instead, with refill queues between the stages (see `micro_batch`).

        Args:
            x: the input batch.
            threshold: T for this call; `self.threshold` when None. Above 1: no early exits.

        Returns:
            `EarlyExitResult(logits, exit_index, cost)`.

        Raises:
            TypeError: `x` is not a floating-point tensor in the net's dtype (outside autocast).
            ValueError: `x` is not a batch of `input_size`'s rank and channels, or lies on
                another device than the net; or `threshold` is NaN or negative.
        """
        t = self.threshold if threshold is None else check_threshold(threshold)
        check_inputs(x, self.input_size, next(self.parameters(), None))
        stages, heads = self._inference_stages(chained=True), self._inference_heads()
        micro = self.resolve_micro_batch(x)
        # Micro-batches only where every module is in eval mode: a train-mode batch norm
        # normalises by its batch (and updates its statistics once per call).
        if micro is not None and x.shape[0] > micro and not self._any_module_training():
            return run_micro_batches(stages, heads, x, t, micro, self.exit_costs, self.num_classes)
        return run_early_exit(stages, heads, x, t, self.exit_costs, self.num_classes)

    def forward(self, x: torch.Tensor) -> ExitOutputs | torch.Tensor:
        """`ExitOutputs` in train mode; early-exit logits `(B, num_classes)` in eval mode."""
        if self.training:
            return self.forward_all(x)
        return self.early_exit(x).logits

    def extra_repr(self) -> str:
        costs = ", ".join(f"{c:.3f}" for c in self.exit_costs.tolist())
        return (
            f"num_exits={self.num_exits}, exit_names={self.exit_names}, "
            f"exit_costs=[{costs}], threshold={self.threshold}"
        )


def _resolve_config(
    n_exits: int | EarlyExitConfig,
    dist: str,
    exit_type: str,
    input_size: Sequence[int] | None,
    threshold: float,
    exit_names: Sequence[str] | None,
    grad_scale: float | None,
) -> EarlyExitConfig:
    if isinstance(n_exits, EarlyExitConfig):
        return dataclasses.replace(n_exits)
    return EarlyExitConfig(
        n_exits=n_exits,
        dist=dist,  # type: ignore[arg-type]
        exit_type=exit_type,  # type: ignore[arg-type]
        threshold=threshold,
        input_size=tuple(input_size) if input_size is not None else None,  # type: ignore[arg-type]
        exit_names=exit_names,  # type: ignore[arg-type]
        grad_scale=grad_scale,
    )


def _choose_exits(
    prof: FlopProfile, config: EarlyExitConfig, model_name: str
) -> tuple[list[int], list[str]]:
    """The candidates to put the exits after, and the warnings the placement gives."""
    names = prof.names()
    if config.exit_names is not None:
        found = [find_by_name(n, prof.candidates) for n in config.exit_names]
        missing = [n for n, k in zip(config.exit_names, found) if k is None]
        if missing:
            raise PlacementError(
                f"{model_name} has no candidate exit point named {missing}. Hint: "
                "`earlyexit.profile(model).candidates` lists them."
            )
        picks = [k for k in found if k is not None]
        if picks != sorted(set(picks)):
            raise PlacementError(
                f"`exit_names` {config.exit_names} are not in execution order or name one "
                f"cut point twice ({[names[k] for k in picks]}). Hint: list them in the order "
                "of `earlyexit.profile(model).candidates`, each once."
            )
        return picks, []
    if config.n_exits > len(names):
        raise PlacementError(
            f"{model_name} has {len(names)} candidate exit points but n_exits={config.n_exits}. "
            "Hint: `earlyexit.profile(model)` lists them; use fewer exits."
        )
    targets = distribution_targets(config.dist, config.n_exits)
    heads: dict[tuple[tuple[int, ...], int], int] = {}
    for c in prof.candidates:
        key = (c.shape, c.channel_axis)
        if key not in heads:
            heads[key] = _head_macs(config.exit_type, c.shape, c.channel_axis, prof.num_classes)
    head_fractions = [heads[(c.shape, c.channel_axis)] / prof.total_macs for c in prof.candidates]
    try:
        plan = fit_exits([c.fraction for c in prof.candidates], head_fractions, targets)
    except PlacementError as err:
        raise PlacementError(f"{model_name}: {err}") from err
    notes = []
    if plan.squeezed:
        moved = ", ".join(f"{i} ({names[plan.picks[i]]})" for i in plan.squeezed)
        notes.append(
            f"{model_name}: the {config.dist} rule's picks for {config.n_exits} exits run past "
            "the last cut points where every exit costs less than the model, so exits "
            f"{moved} were squeezed to earlier ones. Hint: use fewer exits or another `dist`; "
            "`earlyexit.profile(model)` lists the candidates."
        )
    if plan.crowded:
        pairs = ", ".join(
            f"{i - 1} ({names[plan.picks[i - 1]]}) and {i} ({names[plan.picks[i]]})"
            for i in plan.crowded
        )
        notes.append(
            f"{model_name}: exits {pairs} are less than half a block apart (one block is "
            f"{plan.block:.3f} of the model's MACs, the median between candidates), so they see "
            "nearly the same features. Hint: use fewer exits or another `dist`."
        )
    return plan.picks, notes


def _head_macs(exit_type: str, shape: tuple[int, ...], channel_axis: int, num_classes: int) -> int:
    """MACs of the exit head a candidate would get, counted without allocating its weights.

    The global random state is left alone, so the net's own heads start as they would have.
    """
    try:
        with torch.device("meta"):
            head = ExitHead(exit_type, shape, channel_axis, num_classes)
        return count_macs(head, torch.zeros(1, *shape, device="meta"))
    except Exception:  # a head that cannot run on the meta device is counted for real
        with torch.random.fork_rng(devices=[]):
            head = ExitHead(exit_type, shape, channel_axis, num_classes)
        return count_macs(head, torch.zeros(1, *shape))


# Where torchvision (and most hand-written) classifiers keep their final layer.
_CLASSIFIER_ATTRS = ("fc", "classifier", "head", "heads")


def _check_has_classifier(model: nn.Module) -> None:
    """Refuse a headless model: one whose output is its pooled features, not class logits.

    timm models say so themselves (`num_classes == 0`, or `get_classifier()` an identity);
    for others, a `fc` / `classifier` / `head` / `heads` that is an `nn.Identity` (or a
    Sequential ending in one) is the usual way to cut the head off.
    """
    name = type(model).__name__
    num_classes = getattr(model, "num_classes", None)
    get_classifier = getattr(model, "get_classifier", None)
    if isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes == 0:
        why = "num_classes=0"
    elif callable(get_classifier):
        try:
            found = get_classifier()
        except Exception:  # a model's own method; a failure says nothing about its head
            return
        found = list(found) if isinstance(found, (tuple, list)) else [found]
        if not found or not all(isinstance(c, nn.Identity) for c in found):
            return
        why = "its `get_classifier()` is an nn.Identity"
    else:
        for attr in _CLASSIFIER_ATTRS:
            head = getattr(model, attr, None)
            last = head[-1] if isinstance(head, nn.Sequential) and len(head) else head
            if isinstance(last, nn.Identity):
                where = f"`{attr}`" if last is head else f"the last layer of `{attr}`"
                raise TraceError(
                    f"{name} has no classifier: {where} is an nn.Identity, so its output is "
                    "pooled features, not class logits. Hint: create it with num_classes=K, "
                    f"or put a classifier back, e.g. `model.{attr} = nn.Linear(in_features, K)`."
                )
        return
    raise TraceError(
        f"{name} has no classifier ({why}): its output is pooled features, not class logits. "
        "Hint: create it with num_classes=K, e.g. `timm.create_model(name, num_classes=K)`, "
        "or call `model.reset_classifier(K)`."
    )


def check_eval_net(net: object, why: str) -> None:
    """Refuse anything but an `EarlyExitNet` in eval mode, saying `why` eval mode is needed.

    Raises:
        TypeError: `net` is not an `EarlyExitNet`.
        ValueError: it is in train mode.
    """
    if not isinstance(net, EarlyExitNet):
        raise TypeError(f"Expected `net` to be an EarlyExitNet, got {type(net).__name__}.")
    if net.training:
        raise ValueError(
            f"Expected `net` in eval mode, got it in train mode ({why}). Hint: call "
            "`net.eval()` first."
        )


def convert(
    model: nn.Module,
    n_exits: int | EarlyExitConfig,
    dist: str = "pareto",
    exit_type: str = "conv",
    input_size: Sequence[int] | None = None,
    threshold: float = 0.5,
    exit_names: Sequence[str] | None = None,
    grad_scale: float | None = None,
) -> EarlyExitNet:
    """Turn a classifier into an early-exit network.

    The model is traced with torch.fx, profiled with fvcore, and split after the cut points
    that the distribution rule picks (or that `exit_names` names); an exit head goes on each.
    The model itself is not modified: the returned net's stages share its parameters.

    Args:
        model: a timm, torchvision or other traceable classifier.
        n_exits: N, the number of early exits, or a full `EarlyExitConfig` (then the other
            arguments are not used).
        dist: `pareto`, `golden_ratio` (aliases `gold_ratio`, `golden`), `fine`, `linear` or
            `quadratic`.
        exit_type: `conv` (default: a pooled 3×3 conv before the branches, see
            `earlyexit.heads`), or the paper's `plain`, `pool` or `bnpool`.
        input_size: `(C, H, W)`; taken from `model.pretrained_cfg["input_size"]` when None.
        threshold: T for early-exit inference (the paper uses 0.5).
        exit_names: the N cut points to put the exits after, in execution order, instead of
            the ones `dist` picks; each by its name or any alias (`layer1.2` or `layer1`).
        grad_scale: the factor on the gradient from each exit head into the backbone in
            training; `None` is 0.1 for `conv` heads and 1.0 (the paper's) for the others.
            See `EarlyExitConfig`.

    Returns:
        The `EarlyExitNet`, on the model's device, in the model's mode.

    Raises:
        ValueError: for bad argument values.
        TraceError: when the model cannot be traced, profiled or is not a classifier (a
            headless model, its classifier an identity, included).
        PlacementError: when the exits cannot be placed (e.g. too few candidates).

    Example:
        >>> import timm, earlyexit
        >>> net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3, dist="linear")
        >>> net.num_exits, net.exit_names
        (3, ['layer1.2', 'layer2.1', 'layer3.0'])
        >>> net.backbone.get_submodule("layer1.2") is net.backbone.layer1[2]
        True
        >>> earlyexit.convert(net.backbone, 2, exit_names=["layer1", "layer2"]).exit_names
        ['layer1.2', 'layer2.2']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"Expected `model` to be an nn.Module, got {type(model).__name__}.")
    if isinstance(model, EarlyExitNet):
        raise TypeError("`model` is already an EarlyExitNet. Hint: convert its `backbone`.")
    _check_has_classifier(model)
    config = _resolve_config(
        n_exits, dist, exit_type, input_size, threshold, exit_names, grad_scale
    )
    config.input_size = resolve_input_size(model, config.input_size)
    analysis = analyse_model(model, config.input_size)
    prof = profile_analysis(analysis)
    picks, notes = _choose_exits(prof, config, type(model).__name__)
    for note in notes:
        warnings.warn(note, EarlyExitWarning, stacklevel=2)
    chosen = [prof.candidates[k] for k in picks]
    config.exit_names = [c.name for c in chosen]
    cumulative = [c.cumulative_macs for c in chosen] + [prof.total_macs]
    stage_macs = [b - a for a, b in zip([0, *cumulative[:-1]], cumulative)]
    head_macs = [
        _head_macs(config.exit_type, c.shape, c.channel_axis, prof.num_classes) for c in chosen
    ]
    heads = [ExitHead(config.exit_type, c.shape, c.channel_axis, prof.num_classes) for c in chosen]
    staged = split_model(analysis, config.exit_names)
    return EarlyExitNet(model, staged, heads, config, stage_macs=stage_macs, head_macs=head_macs)
