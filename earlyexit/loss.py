"""The EENet training criterion: the paper's cost-aware losses, computed in log space.

Notation (Demir & Akbas, §3.3). An early-exit net has N early exits and a final exit N. For
exit i, z_i are its class logits, ŷ_i = softmax(z_i), a_i its confidence logit (early exits
only), h_i = sigmoid(a_i) its confidence, and c_i its relative cost. The soft classification
output and the soft cost (Eqs. 6 and 7) are

    Ŷ_N = ŷ_N,   Ŷ_i = h_i ŷ_i + (1 − h_i) Ŷ_{i+1}
    C_N = c_N,   C_i = h_i c_i + (1 − h_i) C_{i+1}        for i = N−1, …, 0.

Ŷ_i is a mixture of probabilities, and taking its log after forming it underflows to
log 0 = −inf as soon as a classifier or a confidence saturates (which training drives them to).
So the mixture is formed in log space instead: with p_i = log_softmax(z_i),
log h_i = logsigmoid(a_i) and log(1 − h_i) = logsigmoid(−a_i),

    log Ŷ_N = p_N,   log Ŷ_i = logaddexp(log h_i + p_i, log(1 − h_i) + log Ŷ_{i+1}),

which is the same quantity, exactly, and stays finite. CE(y, Ŷ) below is the cross-entropy
of the targets against Ŷ, −log Ŷ[y] for a class index y (−Σ_k t_k log Ŷ_k for soft targets
t), averaged over the batch; mean(C_i) is C_i averaged over the batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit.outputs import ExitOutputs

__all__ = [
    "DEFAULT_EXIT_CE_WEIGHT",
    "DEFAULT_VERSION",
    "EENetLoss",
    "LossVersion",
    "eenet_loss",
    "versions",
]

LossVersion = Literal["v2+ce", "v2", "v1", "mc", "cost"]

#: Every accepted `version`: the library's objective first, then the paper's four formulas.
versions: tuple[str, ...] = ("v2+ce", "v2", "v1", "mc", "cost")

#: The version `EENetLoss` and `eenet_loss` use when none is given.
DEFAULT_VERSION: LossVersion = "v2+ce"

#: The weight w of the per-exit cross-entropy term of `"v2+ce"` when none is given.
DEFAULT_EXIT_CE_WEIGHT: float = 0.5


def _check_version(version: object) -> None:
    if version not in versions:
        valid = ", ".join(repr(v) for v in versions)
        raise ValueError(f"Expected `version` to be one of {valid}, got {version!r}.")


def _check_non_negative(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"Expected `{name}` to be a non-negative float, got {type(value).__name__} {value!r}."
        )
    value = float(value)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Expected `{name}` to be a non-negative float, got {value!r}.")
    return value


def _check_label_smoothing(label_smoothing: object) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(
            "Expected `label_smoothing` to be a float in [0, 1), got "
            f"{type(label_smoothing).__name__} {label_smoothing!r}."
        )
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(
            f"Expected `label_smoothing` to be a float in [0, 1), got {label_smoothing!r}."
        )
    return label_smoothing


def _resolve_exit_ce_weight(version: str, exit_ce_weight: object) -> float:
    if exit_ce_weight is None:
        return DEFAULT_EXIT_CE_WEIGHT if version == "v2+ce" else 0.0
    weight = _check_non_negative("exit_ce_weight", exit_ce_weight)
    if version != "v2+ce" and weight != 0.0:
        raise ValueError(
            f"`exit_ce_weight` is only used by version 'v2+ce', got version={version!r} with "
            f"exit_ce_weight={weight!r}. Hint: the paper's versions are exact; use "
            "version='v2+ce' to add the per-exit cross-entropy."
        )
    return weight


def _check_outputs(outputs: ExitOutputs) -> tuple[list[Tensor], list[Tensor], Tensor]:
    try:
        logits, confidence_logits, costs = (
            outputs.logits,
            outputs.confidence_logits,
            outputs.costs,
        )
    except AttributeError as err:
        raise TypeError(
            f"Expected `outputs` to be an ExitOutputs, got {type(outputs).__name__}. "
            "Hint: call the net in train mode (`net.train(); net(x)`) or use `net.forward_all(x)`."
        ) from err
    if not isinstance(logits, Sequence) or not all(isinstance(z, Tensor) for z in logits):
        raise TypeError("Expected `outputs.logits` to be a list of tensors.")
    if not isinstance(confidence_logits, Sequence) or not all(
        isinstance(a, Tensor) for a in confidence_logits
    ):
        raise TypeError("Expected `outputs.confidence_logits` to be a list of tensors.")
    if not isinstance(costs, Tensor):
        raise TypeError(f"Expected `outputs.costs` to be a tensor, got {type(costs).__name__}.")
    if len(logits) == 0:
        raise ValueError("Expected `outputs.logits` to hold at least one tensor, got none.")
    n = len(logits) - 1
    if len(confidence_logits) != n:
        raise ValueError(
            f"Expected N = {n} confidence logits for {n + 1} class-logit tensors (N early exits "
            f"and the final exit), got {len(confidence_logits)}. Hint: the final exit has no "
            "confidence branch."
        )
    if costs.shape != (n + 1,):
        raise ValueError(
            f"Expected `outputs.costs` of shape ({n + 1},), one cost per exit, got "
            f"{tuple(costs.shape)}."
        )
    shape = logits[0].shape
    if len(shape) != 2:
        raise ValueError(
            f"Expected class logits of shape (B, num_classes), got {tuple(shape)} at exit 0."
        )
    if shape[0] == 0:
        raise ValueError("Expected a non-empty batch, got batch size 0.")
    for i, z in enumerate(logits):
        if z.shape != shape:
            raise ValueError(
                f"Expected every exit's class logits to have the shape of exit 0's, "
                f"{tuple(shape)}, got {tuple(z.shape)} at exit {i}."
            )
    for i, a in enumerate(confidence_logits):
        if a.shape != shape[:1]:
            raise ValueError(
                f"Expected confidence logits of shape ({shape[0]},), got {tuple(a.shape)} at "
                f"exit {i}. Hint: squeeze the confidence branch's last axis."
            )
    return list(logits), list(confidence_logits), costs


def _check_target(target: object, batch: int, num_classes: int, validate: bool) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"Expected `target` to be a tensor, got {type(target).__name__}.")
    if target.is_floating_point():
        if target.shape != (batch, num_classes):
            raise ValueError(
                f"Expected soft targets of shape ({batch}, {num_classes}) to match the logits, "
                f"got {tuple(target.shape)}. Hint: class indices must be an integer tensor."
            )
        return
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(
            "Expected `target` to be integer class indices or float soft targets, got dtype "
            f"{target.dtype}."
        )
    if target.shape != (batch,):
        raise ValueError(
            f"Expected class indices of shape ({batch},) to match the logits, got "
            f"{tuple(target.shape)}."
        )
    if validate:
        # One host sync for both bounds.
        low, high = torch.stack((target.min(), target.max())).tolist()
        if low < 0 or high >= num_classes:
            bad = low if low < 0 else high
            raise ValueError(
                f"Expected class indices in [0, {num_classes - 1}], got {bad}. Hint: the "
                f"logits have {num_classes} classes; check `num_classes` of the model."
            )


def _cross_entropy(log_probs: Tensor, target: Tensor, label_smoothing: float) -> Tensor:
    """Batch-mean cross-entropy of targets against normalized log-probabilities."""
    if target.is_floating_point():
        nll = -(target * log_probs).sum(dim=1)
    else:
        nll = -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    if label_smoothing:
        # The smoothed target is (1 − ε) t + ε / K, so its CE is the mix of the two CEs.
        nll = (1.0 - label_smoothing) * nll - label_smoothing * log_probs.mean(dim=1)
    return nll.mean()


def _mixture_log_probs(log_probs: list[Tensor], confidence_logits: list[Tensor]) -> list[Tensor]:
    """log Ŷ_0, …, log Ŷ_N from p_i = log_softmax(z_i) and the confidence logits a_i."""
    mixtures = [log_probs[-1]]
    for p, a in zip(reversed(log_probs[:-1]), reversed(confidence_logits), strict=True):
        a = a.unsqueeze(1)
        mixtures.append(torch.logaddexp(F.logsigmoid(a) + p, F.logsigmoid(-a) + mixtures[-1]))
    mixtures.reverse()
    return mixtures


def _soft_costs(confidence_logits: list[Tensor], costs: Tensor) -> list[Tensor]:
    """C_0, …, C_N, each of shape (B,), from the confidence logits a_i and the costs c_i."""
    batch = confidence_logits[0].shape[0] if confidence_logits else 1
    soft = [costs[-1].expand(batch)]
    for i in reversed(range(len(confidence_logits))):
        a = confidence_logits[i]
        # sigmoid(−a) rather than 1 − sigmoid(a): no cancellation when h_i is near 1.
        soft.append(torch.sigmoid(a) * costs[i] + torch.sigmoid(-a) * soft[-1])
    soft.reverse()
    return soft


def eenet_loss(
    outputs: ExitOutputs,
    target: Tensor,
    lam: float = 1.0,
    version: LossVersion = DEFAULT_VERSION,
    *,
    exit_ce_weight: float | None = None,
    label_smoothing: float = 0.0,
    validate: bool = True,
) -> Tensor:
    """The EENet training loss of a batch, computed in log space.

    Versions (notation in the module docstring; CE is the batch mean, λ = `lam`):

    - `"v2+ce"` (default): L_v2 plus a per-exit cross-entropy,
      L_v2 + w · Σ_{i=0..N} CE(y, ŷ_i), with ŷ_i = softmax(z_i) each exit's own prediction
      and w = `exit_ce_weight`. Under a faithful L_v2, exit i's classifier gets gradient only
      through h_i, so once an early h_i collapses towards 0 that classifier stops learning
      (measured: resnet8 with 2 exits on MNIST left the early classifiers at chance after 2
      epochs). The extra term trains every exit's own classifier directly, as SDN and ZTW do.
    - `"v2"`: the paper's L_v2 (Eq. 9), Σ_{i=0..N} [CE(y, Ŷ_i) + λ · mean(C_i)].
    - `"v1"`: the paper's L_v1 (Eq. 8), CE(y, Ŷ_0) + λ · mean(C_0).
    - `"mc"`: the classification part of L_v2 alone, Σ_{i=0..N} CE(y, Ŷ_i) (λ is not used).
    - `"cost"`: the cost part of L_v2 alone, Σ_{i=0..N} mean(C_i) (λ and the targets' values
      are not used).

    Every CE term, the mixtures' and `"v2+ce"`'s per-exit ones, uses the same targets and
    `label_smoothing`. The loss is computed in at least float32, whatever the logits' dtype.

    Args:
        outputs: every exit's outputs, as a train-mode forward or `forward_all` returns them:
            N+1 class-logit tensors `(B, K)`, N confidence-logit tensors `(B,)` and the N+1
            costs.
        target: class indices, an integer tensor `(B,)` in `[0, K)`, or soft targets, a float
            tensor `(B, K)` of per-sample class probabilities (as timm's Mixup makes). Soft
            targets are not checked to sum to one.
        lam: λ, the weight of the cost terms.
        version: which objective; one of `versions`.
        exit_ce_weight: w, the weight of the per-exit cross-entropy of `"v2+ce"`; `None`
            means `DEFAULT_EXIT_CE_WEIGHT`. The paper's versions take none (or 0).
        label_smoothing: ε in [0, 1); every CE is taken against (1 − ε) · target + ε / K.
        validate: check that class indices lie in `[0, K)`. The check costs one host sync
            per call on GPU; turn it off once the data pipeline is trusted.

    Returns:
        A scalar tensor.

    Raises:
        TypeError: an argument has the wrong type (a non-number `lam`, a bool target, ...).
        ValueError: an unknown version, a negative or non-finite `lam`, shapes that don't
            match each other, or class indices out of range.

    Example:
        >>> import torch
        >>> from earlyexit import ExitOutputs
        >>> from earlyexit.loss import eenet_loss
        >>> _ = torch.manual_seed(0)
        >>> outputs = ExitOutputs(
        ...     logits=[torch.randn(8, 10, requires_grad=True) for _ in range(3)],
        ...     confidence_logits=[torch.randn(8, requires_grad=True) for _ in range(2)],
        ...     costs=torch.tensor([0.2, 0.5, 1.02]),
        ... )
        >>> target = torch.randint(0, 10, (8,))
        >>> loss = eenet_loss(outputs, target, lam=0.5, version="v2")
        >>> loss.backward()
        >>> loss.shape, outputs.confidence_logits[0].grad.shape
        (torch.Size([]), torch.Size([8]))
    """
    _check_version(version)
    lam = _check_non_negative("lam", lam)
    exit_ce_weight = _resolve_exit_ce_weight(version, exit_ce_weight)
    label_smoothing = _check_label_smoothing(label_smoothing)
    logits, confidence_logits, costs = _check_outputs(outputs)
    batch, num_classes = logits[0].shape
    _check_target(target, batch, num_classes, validate)

    # Low-precision logits (autocast) would lose the small mixture terms; the loss is cheap.
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    target = target.to(dtype) if target.is_floating_point() else target.long()
    confidence_logits = [a.to(dtype) for a in confidence_logits]
    costs = costs.to(device=logits[0].device, dtype=dtype)
    if version == "cost":
        return torch.stack([c.mean() for c in _soft_costs(confidence_logits, costs)]).sum()

    log_probs = [F.log_softmax(z.to(dtype), dim=1) for z in logits]
    mixtures = _mixture_log_probs(log_probs, confidence_logits)
    if version == "v1":
        soft_cost_0 = _soft_costs(confidence_logits, costs)[0]
        return _cross_entropy(mixtures[0], target, label_smoothing) + lam * soft_cost_0.mean()

    loss = torch.stack([_cross_entropy(m, target, label_smoothing) for m in mixtures]).sum()
    if version == "mc":
        return loss
    soft_costs = _soft_costs(confidence_logits, costs)
    loss = loss + lam * torch.stack([c.mean() for c in soft_costs]).sum()
    if exit_ce_weight:  # only "v2+ce" has a non-zero weight
        exit_ce = torch.stack([_cross_entropy(p, target, label_smoothing) for p in log_probs])
        loss = loss + exit_ce_weight * exit_ce.sum()
    return loss


class EENetLoss(nn.Module):
    """The EENet training criterion, `loss = criterion(outputs, target)`.

    A thin wrapper of `eenet_loss` that checks and keeps its settings. Versions (notation
    in the module docstring; CE is the batch mean, λ = `lam`):

    - `"v2+ce"` (default): L_v2 plus a per-exit cross-entropy,
      L_v2 + w · Σ_{i=0..N} CE(y, ŷ_i), with ŷ_i = softmax(z_i) each exit's own prediction
      and w = `exit_ce_weight`. Under a faithful L_v2, exit i's classifier gets gradient only
      through h_i, so once an early h_i collapses towards 0 that classifier stops learning
      (measured: resnet8 with 2 exits on MNIST left the early classifiers at chance after 2
      epochs). The extra term trains every exit's own classifier directly, as SDN and ZTW do.
    - `"v2"`: the paper's L_v2 (Eq. 9), Σ_{i=0..N} [CE(y, Ŷ_i) + λ · mean(C_i)].
    - `"v1"`: the paper's L_v1 (Eq. 8), CE(y, Ŷ_0) + λ · mean(C_0).
    - `"mc"`: the classification part of L_v2 alone, Σ_{i=0..N} CE(y, Ŷ_i) (λ is not used).
    - `"cost"`: the cost part of L_v2 alone, Σ_{i=0..N} mean(C_i) (λ and the targets' values
      are not used).

    Args:
        lam: λ, the weight of the cost terms.
        version: which objective; one of `versions`, `DEFAULT_VERSION` when not given.
        exit_ce_weight: w, the weight of the per-exit cross-entropy of `"v2+ce"`; `None`
            means `DEFAULT_EXIT_CE_WEIGHT`. The paper's versions take none (or 0).
        label_smoothing: ε in [0, 1); every CE is taken against (1 − ε) · target + ε / K.
        validate: check each batch's class indices lie in `[0, K)` (one host sync per call
            on GPU).

    Raises:
        TypeError: a setting has the wrong type.
        ValueError: an unknown version or an out-of-range setting.

    Example:
        >>> import torch
        >>> from earlyexit import ExitOutputs
        >>> from earlyexit.loss import EENetLoss
        >>> criterion = EENetLoss(lam=1.0)
        >>> criterion
        EENetLoss(lam=1.0, version='v2+ce', exit_ce_weight=0.5)
        >>> outputs = ExitOutputs(
        ...     logits=[torch.zeros(4, 3), torch.zeros(4, 3)],
        ...     confidence_logits=[torch.zeros(4)],
        ...     costs=torch.tensor([0.5, 1.0]),
        ... )
        >>> round(criterion(outputs, torch.tensor([0, 1, 2, 0])).item(), 4)
        5.0458
    """

    versions: tuple[str, ...] = versions

    def __init__(
        self,
        lam: float = 1.0,
        version: LossVersion = DEFAULT_VERSION,
        *,
        exit_ce_weight: float | None = None,
        label_smoothing: float = 0.0,
        validate: bool = True,
    ) -> None:
        super().__init__()
        _check_version(version)
        self.lam = _check_non_negative("lam", lam)
        self.version = version
        self.exit_ce_weight = _resolve_exit_ce_weight(version, exit_ce_weight)
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.validate = bool(validate)

    def forward(self, outputs: ExitOutputs, target: Tensor) -> Tensor:
        """The loss of a batch; see `eenet_loss` for the arguments.

        Args:
            outputs: every exit's outputs (`ExitOutputs`).
            target: class indices `(B,)` or soft targets `(B, K)`.

        Returns:
            A scalar tensor.
        """
        return eenet_loss(
            outputs,
            target,
            lam=self.lam,
            version=self.version,  # type: ignore[arg-type]
            exit_ce_weight=self.exit_ce_weight if self.version == "v2+ce" else None,
            label_smoothing=self.label_smoothing,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        parts = [f"lam={self.lam!r}", f"version={self.version!r}"]
        if self.version == "v2+ce":
            parts.append(f"exit_ce_weight={self.exit_ce_weight!r}")
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing!r}")
        if not self.validate:
            parts.append("validate=False")
        return ", ".join(parts)
