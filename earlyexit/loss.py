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
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from earlyexit._loss_checks import (
    check_label_smoothing,
    check_non_negative,
    check_outputs,
    check_target,
    check_version,
    resolve_exit_ce_weight,
    resolve_exits_options,
)
from earlyexit.outputs import ExitOutputs

__all__ = [
    "DEFAULT_EXIT_CE_WEIGHT",
    "DEFAULT_VERSION",
    "EENetLoss",
    "LossVersion",
    "eenet_loss",
    "versions",
]

LossVersion = Literal["exits", "v2+ce", "v2", "v1", "mc", "cost"]

#: Every accepted `version`: the library's objectives first, then the paper's four formulas.
versions: tuple[str, ...] = ("exits", "v2+ce", "v2", "v1", "mc", "cost")

#: The version `EENetLoss` and `eenet_loss` use when none is given.
DEFAULT_VERSION: LossVersion = "exits"

#: The weight w of the per-exit terms when none is given, per version that has them.
DEFAULT_EXIT_CE_WEIGHTS: dict[str, float] = {"exits": 1.0, "v2+ce": 0.5}

#: The weight w of `"v2+ce"`'s per-exit cross-entropy when none is given.
DEFAULT_EXIT_CE_WEIGHT: float = DEFAULT_EXIT_CE_WEIGHTS["v2+ce"]

#: α of `"exits"` when none is given: the share of distillation in an early exit's term.
DEFAULT_DISTILL: float = 0.0

#: τ of the distillation when none is given.
DEFAULT_TEMPERATURE: float = 3.0

#: q of `"exits"` when none is given: the accuracy an early exit must expect of a sample
#: before the confidence h reaches 0.5 (so before the default threshold lets it leave).
DEFAULT_EXIT_PRECISION: float = 0.95

# α, τ and q when not given, in the order `resolve_exits_options` takes them.
_EXITS_DEFAULTS = (DEFAULT_DISTILL, DEFAULT_TEMPERATURE, DEFAULT_EXIT_PRECISION)


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


def _confidence_labels(log_probs: Tensor, final_log_probs: Tensor, labels: Tensor) -> Tensor:
    """What an early exit's confidence learns to predict: 1 where the exit is right.

    (`benchmarks/recipe.py` swaps in other targets to measure them, e.g. "leaving costs
    nothing": the exit is right or the final exit is wrong.)
    """
    return log_probs.detach().argmax(dim=1) == labels


def _precision_logit(q: float, final_log_probs: Tensor, labels: Tensor) -> float | Tensor:
    """logit q, the confidence logits' shift (a seam: the recipe benchmark tries other rules)."""
    return math.log(q / (1.0 - q))


def _exits_loss(
    log_probs: list[Tensor],
    logits: list[Tensor],
    confidence_logits: list[Tensor],
    target: Tensor,
    weight: float,
    alpha: float,
    tau: float,
    q: float,
    label_smoothing: float,
) -> Tensor:
    """`"exits"`: the final exit's CE, w × each early exit's term, and the confidences' BCE."""
    loss = _cross_entropy(log_probs[-1], target, label_smoothing)
    if alpha:
        teacher = F.softmax(logits[-1].detach().to(log_probs[0].dtype) / tau, dim=1)
    labels = target.argmax(dim=1) if target.is_floating_point() else target
    offset = _precision_logit(q, log_probs[-1], labels)
    early = []
    for z, p, a in zip(logits[:-1], log_probs[:-1], confidence_logits, strict=True):
        term = _cross_entropy(p, target, label_smoothing)
        if alpha:
            student = F.log_softmax(z.to(p.dtype) / tau, dim=1)
            kl = F.kl_div(student, teacher, reduction="batchmean") * tau**2
            term = (1.0 - alpha) * term + alpha * kl
        # h = sigmoid(a) is trained so that sigmoid(a + logit q) estimates P(exit right):
        # h >= 0.5 exactly when the exit expects to be right with probability >= q.
        right = _confidence_labels(p, log_probs[-1], labels).to(p.dtype)
        bce = F.binary_cross_entropy_with_logits(a + offset, right)
        early.append(weight * term + bce)
    if early:
        loss = loss + torch.stack(early).sum()
    return loss


def eenet_loss(
    outputs: ExitOutputs,
    target: Tensor,
    lam: float = 1.0,
    version: LossVersion = DEFAULT_VERSION,
    *,
    exit_ce_weight: float | None = None,
    distill: float | None = None,
    temperature: float | None = None,
    exit_precision: float | None = None,
    label_smoothing: float = 0.0,
    validate: bool = True,
) -> Tensor:
    """The EENet training loss of a batch, computed in log space.

    Versions (notation in the module docstring; CE is the batch mean, λ = `lam`):

    - `"exits"` (default): every exit learns its own classifier and the early exits learn
      when to trust it, CE(y, ŷ_N) + Σ_{i<N} [w · ((1 − α) CE(y, ŷ_i) + α τ² KL(ŷ_N^τ ‖ ŷ_i^τ))
      + BCE(a_i + logit q, 1[ŷ_i right])], with ŷ_i = softmax(z_i), ŷ^τ the softmax at
      temperature τ, the final exit's ŷ_N^τ a detached teacher, w = `exit_ce_weight`,
      α = `distill`, τ = `temperature` and q = `exit_precision`. The confidence h_i =
      sigmoid(a_i) is trained to say whether exit i is right (the label detached), shifted so
      that h_i ≥ 0.5 when exit i expects to be right with probability ≥ q: the default
      threshold then keeps the accuracy. λ is not used. The docs' training-recipe page has
      the ablation behind it.
    - `"v2+ce"`: L_v2 plus a per-exit cross-entropy, L_v2 + w · Σ_{i=0..N} CE(y, ŷ_i) (the
      library's default before `"exits"`). Under a faithful L_v2, exit i's classifier gets
      gradient only through h_i, so once an early h_i collapses towards 0 that classifier
      stops learning; the extra term trains every exit's own classifier directly.
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
        exit_ce_weight: w, the weight of the early exits' terms of `"exits"` and of the
            per-exit cross-entropy of `"v2+ce"`; `None` means the version's entry of
            `DEFAULT_EXIT_CE_WEIGHTS`. The paper's versions take none (or 0).
        distill: α in [0, 1] of `"exits"`, the share of self-distillation from the final
            exit in each early exit's term; `None` means `DEFAULT_DISTILL`.
        temperature: τ > 0 of the distillation; `None` means `DEFAULT_TEMPERATURE`.
        exit_precision: q in (0, 1) of `"exits"`: h_i ≥ 0.5 means exit i expects to be right
            with probability ≥ q; `None` means `DEFAULT_EXIT_PRECISION`.
        label_smoothing: ε in [0, 1); every CE is taken against (1 − ε) · target + ε / K.
        validate: check that class indices lie in `[0, K)`. The check costs one host sync
            per call on GPU; turn it off once the data pipeline is trusted.

    Returns:
        A scalar tensor.

    Raises:
        TypeError: an argument has the wrong type (a non-number `lam`, a bool target, ...).
        ValueError: an unknown version, a negative or non-finite `lam`, a setting out of
            range or given to a version that does not use it, distillation with no early
            exits, shapes that don't match each other, or class indices out of range.

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
    check_version(version, versions)
    lam = check_non_negative("lam", lam)
    exit_ce_weight = resolve_exit_ce_weight(version, exit_ce_weight, DEFAULT_EXIT_CE_WEIGHTS)
    alpha, tau, q = resolve_exits_options(
        version, distill, temperature, exit_precision, _EXITS_DEFAULTS
    )
    label_smoothing = check_label_smoothing(label_smoothing)
    logits, confidence_logits, costs = check_outputs(outputs)
    batch, num_classes = logits[0].shape
    check_target(target, batch, num_classes, validate)
    if alpha and len(logits) < 2:
        raise ValueError(
            "Expected early exits to distill into, got a net with none (only the final exit). "
            "Hint: use distill=0, or convert with n_exits >= 1."
        )

    # Low-precision logits (autocast) would lose the small mixture terms; the loss is cheap.
    dtype = torch.promote_types(logits[0].dtype, torch.float32)
    target = target.to(dtype) if target.is_floating_point() else target.long()
    confidence_logits = [a.to(dtype) for a in confidence_logits]
    costs = costs.to(device=logits[0].device, dtype=dtype)
    if version == "cost":
        return torch.stack([c.mean() for c in _soft_costs(confidence_logits, costs)]).sum()

    log_probs = [F.log_softmax(z.to(dtype), dim=1) for z in logits]
    if version == "exits":
        return _exits_loss(
            log_probs,
            logits,
            confidence_logits,
            target,
            exit_ce_weight,
            alpha,
            tau,
            q,
            label_smoothing,
        )
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

    A thin wrapper of `eenet_loss` that checks and keeps its settings; `eenet_loss` lists the
    versions and what each computes.

    Args:
        lam: λ, the weight of the cost terms.
        version: which objective; one of `versions`, `DEFAULT_VERSION` when not given.
        exit_ce_weight: w, the weight of the early exits' terms of `"exits"` and of the
            per-exit cross-entropy of `"v2+ce"`; `None` means the version's entry of
            `DEFAULT_EXIT_CE_WEIGHTS`. The paper's versions take none (or 0).
        distill: α in [0, 1] of `"exits"`, the share of self-distillation from the final
            exit in each early exit's term; `None` means `DEFAULT_DISTILL`.
        temperature: τ > 0 of the distillation; `None` means `DEFAULT_TEMPERATURE`.
        exit_precision: q in (0, 1) of `"exits"`: h_i ≥ 0.5 means exit i expects to be right
            with probability ≥ q; `None` means `DEFAULT_EXIT_PRECISION`.
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
        EENetLoss(lam=1.0, version='exits', exit_ce_weight=1.0, distill=0.0, exit_precision=0.95)
        >>> outputs = ExitOutputs(
        ...     logits=[torch.zeros(4, 3), torch.zeros(4, 3)],
        ...     confidence_logits=[torch.zeros(4)],
        ...     costs=torch.tensor([0.5, 1.0]),
        ... )
        >>> round(criterion(outputs, torch.tensor([0, 1, 2, 0])).item(), 4)
        3.7207
    """

    versions: tuple[str, ...] = versions

    def __init__(
        self,
        lam: float = 1.0,
        version: LossVersion = DEFAULT_VERSION,
        *,
        exit_ce_weight: float | None = None,
        distill: float | None = None,
        temperature: float | None = None,
        exit_precision: float | None = None,
        label_smoothing: float = 0.0,
        validate: bool = True,
    ) -> None:
        super().__init__()
        check_version(version, versions)
        self.lam = check_non_negative("lam", lam)
        self.version = version
        self.exit_ce_weight = resolve_exit_ce_weight(
            version, exit_ce_weight, DEFAULT_EXIT_CE_WEIGHTS
        )
        self.distill, self.temperature, self.exit_precision = resolve_exits_options(
            version, distill, temperature, exit_precision, _EXITS_DEFAULTS
        )
        self.label_smoothing = check_label_smoothing(label_smoothing)
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
            exit_ce_weight=self.exit_ce_weight if self.version in DEFAULT_EXIT_CE_WEIGHTS else None,
            **self._exits_options(),
            label_smoothing=self.label_smoothing,
            validate=self.validate,
        )

    def _exits_options(self) -> dict[str, float]:
        if self.version != "exits":
            return {}
        return {
            "distill": self.distill,
            "temperature": self.temperature,
            "exit_precision": self.exit_precision,
        }

    def extra_repr(self) -> str:
        parts = [f"lam={self.lam!r}", f"version={self.version!r}"]
        if self.version in DEFAULT_EXIT_CE_WEIGHTS:
            parts.append(f"exit_ce_weight={self.exit_ce_weight!r}")
        options = self._exits_options()
        if not options.get("distill"):  # τ only matters to the distillation
            options.pop("temperature", None)
        parts += [f"{name}={value!r}" for name, value in options.items()]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing!r}")
        if not self.validate:
            parts.append("validate=False")
        return ", ".join(parts)
