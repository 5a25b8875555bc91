"""The EENet loss: the paper's formulas exactly, in log space, with clear errors."""

from __future__ import annotations

import doctest
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import earlyexit.loss
from earlyexit import ExitOutputs
from earlyexit.loss import (
    DEFAULT_DISTILL,
    DEFAULT_EXIT_CE_WEIGHT,
    DEFAULT_EXIT_CE_WEIGHTS,
    DEFAULT_EXIT_PRECISION,
    DEFAULT_TEMPERATURE,
    DEFAULT_VERSION,
    EENetLoss,
    eenet_loss,
    versions,
)

PAPER_VERSIONS = ["v2", "v1", "mc", "cost"]


def make_outputs(
    n_exits: int,
    batch: int,
    num_classes: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    scale: float = 2.0,
    requires_grad: bool = False,
) -> ExitOutputs:
    gen = torch.Generator().manual_seed(seed)
    logits = [
        (scale * torch.randn(batch, num_classes, generator=gen, dtype=dtype)).requires_grad_(
            requires_grad
        )
        for _ in range(n_exits + 1)
    ]
    confidence_logits = [
        (scale * torch.randn(batch, generator=gen, dtype=dtype)).requires_grad_(requires_grad)
        for _ in range(n_exits)
    ]
    costs = torch.sort(torch.rand(n_exits + 1, generator=gen, dtype=dtype)).values + 0.05
    return ExitOutputs(logits=logits, confidence_logits=confidence_logits, costs=costs)


def make_target(batch: int, num_classes: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, num_classes, (batch,), generator=gen)


def paper_loss(outputs: ExitOutputs, target: torch.Tensor, lam: float, version: str):
    """Eqs. (5)–(9) transcribed in probability space, the way the paper writes them."""
    y_hat = [torch.softmax(z, dim=1) for z in outputs.logits]
    h = [torch.sigmoid(a) for a in outputs.confidence_logits]
    c = outputs.costs
    n = len(h)
    big_y = [None] * (n + 1)
    big_c = [None] * (n + 1)
    big_y[n] = y_hat[n]
    big_c[n] = c[n].expand(len(target))
    for i in reversed(range(n)):
        big_y[i] = h[i][:, None] * y_hat[i] + (1 - h[i][:, None]) * big_y[i + 1]
        big_c[i] = h[i] * c[i] + (1 - h[i]) * big_c[i + 1]

    def ce(probs):
        return -torch.log(probs.gather(1, target[:, None]).squeeze(1)).mean()

    if version == "v1":
        return ce(big_y[0]) + lam * big_c[0].mean()
    if version == "mc":
        return sum(ce(y) for y in big_y)
    if version == "cost":
        return sum(cost.mean() for cost in big_c)
    assert version == "v2"
    return sum(ce(big_y[i]) + lam * big_c[i].mean() for i in range(n + 1))


def exit_ce(outputs: ExitOutputs, target: torch.Tensor, **kwargs) -> torch.Tensor:
    return sum(F.cross_entropy(z, target, **kwargs) for z in outputs.logits)


# --- the paper's formulas ---------------------------------------------------------------------


@pytest.mark.parametrize("version", PAPER_VERSIONS)
@settings(max_examples=25, deadline=None)
@given(
    n_exits=st.integers(0, 4),
    batch=st.integers(1, 6),
    num_classes=st.integers(2, 7),
    lam=st.sampled_from([0.0, 0.3, 1.0, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_paper_versions_match_the_recursive_formulas(
    version, n_exits, batch, num_classes, lam, seed
):
    outputs = make_outputs(n_exits, batch, num_classes, seed=seed)
    target = make_target(batch, num_classes, seed)
    expected = paper_loss(outputs, target, lam, version)
    actual = eenet_loss(outputs, target, lam=lam, version=version)
    assert actual.dtype == torch.float64
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_v2_by_hand():
    # One early exit, two classes, h_0 = 1/2, uniform predictions: Ŷ_i = (1/2, 1/2).
    outputs = ExitOutputs(
        logits=[torch.zeros(1, 2, dtype=torch.float64)] * 2,
        confidence_logits=[torch.zeros(1, dtype=torch.float64)],
        costs=torch.tensor([0.4, 1.0], dtype=torch.float64),
    )
    target = torch.tensor([1])
    c_0 = 0.5 * 0.4 + 0.5 * 1.0
    expected = torch.tensor(2 * math.log(2) + 0.5 * (c_0 + 1.0), dtype=torch.float64)
    torch.testing.assert_close(eenet_loss(outputs, target, lam=0.5, version="v2"), expected)


def exits_loss(outputs, target, w, alpha, tau, q):
    """The `"exits"` recipe written out term by term, one exit at a time."""
    logits, conf = outputs.logits, outputs.confidence_logits
    loss = F.cross_entropy(logits[-1], target)
    teacher = torch.softmax(logits[-1].detach() / tau, dim=1)
    for z, a in zip(logits[:-1], conf):
        student = torch.log_softmax(z / tau, dim=1)
        kl = (teacher * (teacher.log() - student)).sum(1).mean() * tau**2
        term = (1 - alpha) * F.cross_entropy(z, target) + alpha * kl
        right = (z.argmax(1) == target).to(z.dtype)
        p = torch.sigmoid(a + math.log(q / (1 - q)))  # the estimated P(exit right)
        bce = -(right * p.log() + (1 - right) * (1 - p).log()).mean()
        loss = loss + w * term + bce
    return loss


@settings(max_examples=25, deadline=None)
@given(
    n_exits=st.integers(0, 4),
    batch=st.integers(1, 6),
    num_classes=st.integers(2, 7),
    w=st.sampled_from([0.0, 0.3, 1.0]),
    alpha=st.sampled_from([0.0, 0.5, 1.0]),
    tau=st.sampled_from([1.0, 3.0]),
    q=st.sampled_from([0.5, 0.9, 0.99]),
    seed=st.integers(0, 2**16),
)
def test_exits_version_matches_its_terms(n_exits, batch, num_classes, w, alpha, tau, q, seed):
    outputs = make_outputs(n_exits, batch, num_classes, seed=seed, scale=1.0)
    target = make_target(batch, num_classes, seed)
    options = dict(exit_ce_weight=w, distill=alpha if n_exits else 0.0, temperature=tau)
    actual = eenet_loss(outputs, target, version="exits", exit_precision=q, **options)
    expected = exits_loss(outputs, target, w, options["distill"], tau, q)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_default_is_the_exits_recipe():
    assert DEFAULT_VERSION == "exits" and EENetLoss().version == "exits"
    criterion = EENetLoss()
    assert criterion.exit_ce_weight == DEFAULT_EXIT_CE_WEIGHTS["exits"]
    assert (criterion.distill, criterion.temperature, criterion.exit_precision) == (
        DEFAULT_DISTILL,
        DEFAULT_TEMPERATURE,
        DEFAULT_EXIT_PRECISION,
    )
    outputs = make_outputs(3, 5, 4, seed=3, scale=1.0)
    target = make_target(5, 4, 3)
    expected = exits_loss(
        outputs,
        target,
        criterion.exit_ce_weight,
        DEFAULT_DISTILL,
        DEFAULT_TEMPERATURE,
        DEFAULT_EXIT_PRECISION,
    )
    torch.testing.assert_close(criterion(outputs, target), expected)


def test_exits_confidence_at_one_half_means_precision_q():
    # A confidence logit of 0 (h = 1/2) is what BCE settles on for an exit right a fraction q
    # of the time: the gradient of the loss with respect to it vanishes there.
    q = 0.8
    n = 10
    target = torch.zeros(n, dtype=torch.long)
    early = torch.zeros(n, 3, dtype=torch.float64)
    early[: int(q * n), 0] = 5.0  # right on 8 of 10 samples
    early[int(q * n) :, 1] = 5.0
    a = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    outputs = ExitOutputs([early, torch.zeros(n, 3, dtype=torch.float64)], [a], torch.ones(2))
    eenet_loss(outputs, target, version="exits", exit_precision=q).backward()
    torch.testing.assert_close(a.grad.sum(), torch.tensor(0.0, dtype=torch.float64))


def test_exits_teacher_is_detached():
    # Distillation moves the early exits towards the final exit, never the other way.
    outputs = make_outputs(2, 6, 5, seed=21, requires_grad=True)
    target = make_target(6, 5, 21)
    eenet_loss(outputs, target, version="exits", exit_ce_weight=1.0, distill=1.0).backward()
    alone = make_outputs(2, 6, 5, seed=21, requires_grad=True)
    F.cross_entropy(alone.logits[-1], target).backward()
    torch.testing.assert_close(outputs.logits[-1].grad, alone.logits[-1].grad)
    assert all(z.grad.abs().sum() > 0 for z in outputs.logits[:-1])


def test_exits_confidence_does_not_train_the_classifiers():
    # The correctness label is detached: with w = 0, early logits get no gradient at all.
    outputs = make_outputs(2, 6, 5, seed=22, requires_grad=True)
    eenet_loss(outputs, make_target(6, 5, 22), version="exits", exit_ce_weight=0.0).backward()
    assert all(z.grad is None or z.grad.abs().sum() == 0 for z in outputs.logits[:-1])
    assert all(a.grad.abs().sum() > 0 for a in outputs.confidence_logits)


def test_v2_plus_ce_is_v2_plus_the_per_exit_cross_entropy():
    outputs = make_outputs(3, 5, 4, seed=3)
    target = make_target(5, 4, 3)
    v2 = eenet_loss(outputs, target, lam=0.7, version="v2")
    for weight in [None, 0.0, 0.25, 1.0, 3.0]:
        w = DEFAULT_EXIT_CE_WEIGHT if weight is None else weight
        actual = eenet_loss(outputs, target, lam=0.7, version="v2+ce", exit_ce_weight=weight)
        torch.testing.assert_close(actual, v2 + w * exit_ce(outputs, target))
    torch.testing.assert_close(
        EENetLoss(lam=0.7, version="v2+ce")(outputs, target),
        eenet_loss(outputs, target, 0.7, "v2+ce"),
    )


@pytest.mark.parametrize("version", versions)
def test_module_equals_functional(version):
    outputs = make_outputs(2, 6, 5, seed=4)
    target = make_target(6, 5, 4)
    criterion = EENetLoss(lam=0.3, version=version, label_smoothing=0.1)
    expected = eenet_loss(outputs, target, lam=0.3, version=version, label_smoothing=0.1)
    torch.testing.assert_close(criterion(outputs, target), expected)
    assert f"version={version!r}" in repr(criterion)


def test_versions_relate_as_the_paper_says():
    outputs = make_outputs(3, 8, 6, seed=5)
    target = make_target(8, 6, 5)
    loss = {v: eenet_loss(outputs, target, lam=0.6, version=v) for v in PAPER_VERSIONS}
    torch.testing.assert_close(loss["v2"], loss["mc"] + 0.6 * loss["cost"])
    assert eenet_loss(outputs, target, lam=0.0, version="v2") == loss["mc"]


def test_low_precision_logits_are_computed_in_float32():
    outputs = make_outputs(2, 4, 3, seed=6, dtype=torch.bfloat16)
    target = make_target(4, 3, 6)
    loss = eenet_loss(outputs, target)
    assert loss.dtype == torch.float32
    reference = make_outputs(2, 4, 3, seed=6, dtype=torch.bfloat16)
    reference = ExitOutputs(
        logits=[z.double() for z in reference.logits],
        confidence_logits=[a.double() for a in reference.confidence_logits],
        costs=reference.costs.double(),
    )
    torch.testing.assert_close(loss.double(), eenet_loss(reference, target), rtol=1e-5, atol=1e-5)


# --- targets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", versions)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_one_hot_soft_targets_equal_class_indices(version, label_smoothing):
    outputs = make_outputs(3, 7, 5, seed=7)
    target = make_target(7, 5, 7)
    one_hot = F.one_hot(target, 5).double()
    torch.testing.assert_close(
        eenet_loss(outputs, one_hot, version=version, label_smoothing=label_smoothing),
        eenet_loss(outputs, target, version=version, label_smoothing=label_smoothing),
    )


def test_soft_targets_are_a_mix_of_class_losses():
    # CE is linear in the target, so a 30/70 mix of two classes gives the 30/70 mix of losses.
    outputs = make_outputs(2, 4, 3, seed=8)
    first, second = torch.tensor([0, 1, 2, 0]), torch.tensor([2, 2, 1, 1])
    soft = 0.3 * F.one_hot(first, 3).double() + 0.7 * F.one_hot(second, 3).double()
    for version in ["mc", "v1"]:
        expected = 0.3 * eenet_loss(outputs, first, version=version) + 0.7 * eenet_loss(
            outputs, second, version=version
        )
        torch.testing.assert_close(eenet_loss(outputs, soft, version=version), expected)


def test_label_smoothing_matches_pytorch_for_the_exit_term():
    outputs = make_outputs(2, 6, 4, seed=9)
    target = make_target(6, 4, 9)
    base = dict(lam=0.5, label_smoothing=0.15)
    difference = eenet_loss(outputs, target, version="v2+ce", **base) - eenet_loss(
        outputs, target, version="v2", **base
    )
    torch.testing.assert_close(
        difference, DEFAULT_EXIT_CE_WEIGHT * exit_ce(outputs, target, label_smoothing=0.15)
    )


def test_integer_targets_of_any_width():
    outputs = make_outputs(1, 3, 4, seed=10)
    target = torch.tensor([0, 3, 2])
    torch.testing.assert_close(
        eenet_loss(outputs, target.int()), eenet_loss(outputs, target.long())
    )


# --- gradients and numerics ----------------------------------------------------------------


@pytest.mark.parametrize("version", ["v2", DEFAULT_VERSION, "v1", "mc"])
def test_gradients_reach_every_exit(version):
    outputs = make_outputs(3, 8, 5, seed=11, dtype=torch.float32, requires_grad=True)
    eenet_loss(outputs, make_target(8, 5, 11), version=version).backward()
    for i, z in enumerate(outputs.logits):
        assert z.grad is not None and z.grad.abs().sum() > 0, f"no gradient to exit {i}'s logits"
    for i, a in enumerate(outputs.confidence_logits):
        assert a.grad is not None and a.grad.abs().sum() > 0, f"no gradient to confidence {i}"


def test_cost_version_trains_only_the_confidences():
    outputs = make_outputs(2, 4, 3, seed=12, dtype=torch.float32, requires_grad=True)
    eenet_loss(outputs, make_target(4, 3, 12), version="cost").backward()
    assert all(z.grad is None for z in outputs.logits)
    assert all(a.grad.abs().sum() > 0 for a in outputs.confidence_logits)


def extreme_outputs() -> tuple[ExitOutputs, torch.Tensor]:
    """Saturated exits, float32: each early exit is sure (h = 1) and wrong, or unsure (h = 0)."""
    target = torch.tensor([0, 1, 2, 0])
    wrong = 100.0 - 200.0 * F.one_hot(target, 3).float()  # −100 on the true class, +100 elsewhere
    right = -wrong
    logits = [wrong.clone(), right.clone(), wrong.clone(), right.clone()]
    confidence_logits = [
        torch.full((4,), 100.0),
        torch.tensor([100.0, -100.0, 100.0, -100.0]),
        torch.full((4,), -100.0),
    ]
    for t in [*logits, *confidence_logits]:
        t.requires_grad_(True)
    costs = torch.tensor([0.2, 0.4, 0.7, 1.0])
    return ExitOutputs(logits, confidence_logits, costs), target


def test_naive_probability_space_loss_overflows_on_saturated_exits():
    # The point of log space: this is what a transcription of Eq. (5)–(9) gives in float32.
    outputs, target = extreme_outputs()
    naive = paper_loss(outputs, target, lam=1.0, version="v2")
    assert not torch.isfinite(naive)
    naive.backward()
    grads = [t.grad for t in [*outputs.logits, *outputs.confidence_logits]]
    assert not all(torch.isfinite(g).all() for g in grads if g is not None)


@pytest.mark.parametrize("version", versions)
def test_log_space_loss_stays_finite_on_saturated_exits(version):
    outputs, target = extreme_outputs()
    loss = eenet_loss(outputs, target, version=version)
    assert torch.isfinite(loss)
    loss.backward()
    for t in [*outputs.logits, *outputs.confidence_logits]:
        assert t.grad is None or torch.isfinite(t.grad).all()
    # And it is the right value: the same loss in float64, where nothing saturates.
    outputs64 = ExitOutputs(
        logits=[z.detach().double() for z in outputs.logits],
        confidence_logits=[a.detach().double() for a in outputs.confidence_logits],
        costs=outputs.costs.double(),
    )
    torch.testing.assert_close(
        loss.double(), eenet_loss(outputs64, target, version=version), rtol=1e-6, atol=1e-4
    )


# --- bad inputs ---------------------------------------------------------------------------------


def test_bad_lam():
    with pytest.raises(ValueError, match=r"Expected `lam` to be a non-negative float, got nan\."):
        EENetLoss(lam=float("nan"))
    with pytest.raises(ValueError, match=r"Expected `lam` to be a non-negative float, got -1\.0"):
        EENetLoss(lam=-1)
    with pytest.raises(ValueError, match=r"got inf"):
        eenet_loss(make_outputs(1, 2, 3), make_target(2, 3), lam=math.inf)
    with pytest.raises(TypeError, match=r"Expected `lam` to be a non-negative float, got str"):
        EENetLoss(lam="1.0")
    with pytest.raises(TypeError, match=r"got bool"):
        EENetLoss(lam=True)


def test_unknown_version_lists_the_valid_ones():
    with pytest.raises(
        ValueError, match=r"Expected `version` to be one of .*'v2'.*got 'v3'\."
    ) as e:
        EENetLoss(version="v3")
    for name in versions:
        assert repr(name) in str(e.value)
    with pytest.raises(ValueError, match=r"one of"):
        eenet_loss(make_outputs(1, 2, 3), make_target(2, 3), version="L_v2")


def test_bad_settings():
    with pytest.raises(ValueError, match=r"`exit_ce_weight` is only used by versions 'exits' and"):
        EENetLoss(version="v2", exit_ce_weight=0.5)
    EENetLoss(version="v2", exit_ce_weight=0.0)  # an explicit zero is harmless
    with pytest.raises(ValueError, match=r"Expected `exit_ce_weight` to be a non-negative float"):
        EENetLoss(exit_ce_weight=-0.1)
    with pytest.raises(ValueError, match=r"Expected `label_smoothing` to be a float in \[0, 1\)"):
        EENetLoss(label_smoothing=1.0)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"temperature": 0.0}, ValueError, r"Expected `temperature` \(τ\) to be a positive"),
        ({"temperature": -2}, ValueError, r"positive float, got -2\.0\. Hint"),
        ({"distill": 1.5}, ValueError, r"Expected `distill` \(α\) to be in \[0, 1\]"),
        ({"distill": math.nan}, ValueError, r"Expected `distill`"),
        ({"exit_precision": 1.0}, ValueError, r"Expected `exit_precision` \(q\) to be a float"),
        ({"exit_precision": "high"}, TypeError, r"`exit_precision` to be a float in \(0, 1\)"),
        ({"version": "v2", "distill": 0.5}, ValueError, r"`distill` is only used by version"),
        ({"version": "v2+ce", "temperature": 2}, ValueError, r"`temperature` is only used"),
    ],
)
def test_bad_recipe_settings(options, error, message):
    with pytest.raises(error, match=message):
        EENetLoss(**options)


def test_distillation_needs_early_exits():
    outputs = make_outputs(0, 4, 3)
    with pytest.raises(ValueError, match=r"Expected early exits to distill into.*Hint"):
        eenet_loss(outputs, make_target(4, 3), distill=0.5)
    eenet_loss(outputs, make_target(4, 3))  # without distillation, a lone final exit is fine


@pytest.mark.parametrize("bad", [-1, 4])
def test_targets_out_of_range(bad):
    target = torch.tensor([0, bad, 1])
    with pytest.raises(ValueError, match=rf"Expected class indices in \[0, 3\], got {bad}\. Hint"):
        eenet_loss(make_outputs(1, 3, 4), target)


def test_range_check_can_be_skipped():
    # validate=False trusts the data: no check, no host sync (here, an in-range batch).
    outputs, target = make_outputs(1, 3, 4), torch.tensor([0, 3, 1])
    torch.testing.assert_close(
        eenet_loss(outputs, target, validate=False), EENetLoss(validate=False)(outputs, target)
    )


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (torch.tensor([0, 1]), ValueError, r"class indices of shape \(3,\) to match the logits"),
        (torch.zeros(3, 5), ValueError, r"soft targets of shape \(3, 4\) to match the logits"),
        (torch.zeros(2, 4), ValueError, r"soft targets of shape \(3, 4\)"),
        (torch.zeros(3, 4, dtype=torch.long), ValueError, r"class indices of shape \(3,\)"),
        (torch.tensor([True, False, True]), TypeError, r"integer class indices or float soft"),
        ([0, 1, 2], TypeError, r"Expected `target` to be a tensor, got list\."),
    ],
)
def test_target_shape_mismatch(target, error, message):
    with pytest.raises(error, match=message):
        eenet_loss(make_outputs(1, 3, 4), target)


def test_list_length_mismatch():
    outputs = make_outputs(2, 3, 4)
    target = make_target(3, 4)
    fewer = outputs._replace(confidence_logits=outputs.confidence_logits[:1])
    with pytest.raises(ValueError, match=r"Expected N = 2 confidence logits .* got 1\. Hint"):
        eenet_loss(fewer, target)
    short_costs = outputs._replace(costs=outputs.costs[:2])
    with pytest.raises(ValueError, match=r"`outputs.costs` of shape \(3,\).* got \(2,\)\."):
        eenet_loss(short_costs, target)
    with pytest.raises(ValueError, match=r"at least one tensor"):
        eenet_loss(ExitOutputs([], [], torch.ones(1)), target)


def test_logits_shape_mismatch():
    outputs = make_outputs(2, 3, 4)
    target = make_target(3, 4)
    classes = outputs._replace(logits=[*outputs.logits[:2], torch.zeros(3, 5)])
    with pytest.raises(ValueError, match=r"shape of exit 0's, \(3, 4\), got \(3, 5\) at exit 2"):
        eenet_loss(classes, target)
    batch = outputs._replace(logits=[outputs.logits[0], torch.zeros(2, 4), outputs.logits[2]])
    with pytest.raises(ValueError, match=r"got \(2, 4\) at exit 1"):
        eenet_loss(batch, target)
    column = outputs._replace(confidence_logits=[a[:, None] for a in outputs.confidence_logits])
    with pytest.raises(ValueError, match=r"confidence logits of shape \(3,\), got \(3, 1\).*Hint"):
        eenet_loss(column, target)
    flat = outputs._replace(logits=[z.flatten() for z in outputs.logits])
    with pytest.raises(ValueError, match=r"shape \(B, num_classes\), got \(12,\)"):
        eenet_loss(flat, target)
    with pytest.raises(ValueError, match=r"non-empty batch"):
        eenet_loss(make_outputs(1, 0, 4), torch.zeros(0, dtype=torch.long))


def test_outputs_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"Expected `outputs` to be an ExitOutputs, got Tensor"):
        eenet_loss(torch.zeros(3, 4), make_target(3, 4))


def test_docstring_examples_run():
    result = doctest.testmod(earlyexit.loss, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0


@pytest.mark.parametrize("version", PAPER_VERSIONS)
def test_gradients_match_the_recursive_formulas(version):
    target = make_target(5, 4, 13)
    grads = []
    for loss_fn in [eenet_loss, paper_loss]:
        outputs = make_outputs(3, 5, 4, seed=13, requires_grad=True)
        loss_fn(outputs, target, 0.8, version).backward()
        grads.append([t.grad for t in [*outputs.logits, *outputs.confidence_logits]])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
