"""The trade-off curve and threshold calibration agree with early-exit inference exactly."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import earlyexit
from earlyexit.calibrate import (
    DEFAULT_THRESHOLDS,
    NEVER,
    TradeoffCurve,
    calibrate,
    fit_exit_thresholds,
    plot_tradeoff,
    score_exit_thresholds,
    set_exit_thresholds,
    tradeoff_curve,
)
from earlyexit.training import ExitCache, collect_exit_cache, sweep_thresholds

from toy_models import spread_confidences


@pytest.fixture(scope="module")
def net() -> earlyexit.EarlyExitNet:
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=3)
    spread_confidences(net, torch.randn(48, 3, 32, 32))
    return net.eval()


@pytest.fixture(scope="module")
def data(net) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Three batches; half the labels agree with the final exit so accuracies differ."""
    g = torch.Generator().manual_seed(2)
    batches = []
    for size in (16, 16, 9):
        x = torch.randn(size, 3, 32, 32, generator=g)
        with torch.no_grad():
            final = net.forward_all(x).logits[-1].argmax(1)
        y = torch.where(torch.rand(size, generator=g) < 0.5, final, torch.randint(0, 10, (size,)))
        batches.append((x, y))
    return batches


@pytest.fixture(scope="module")
def curve(net, data) -> TradeoffCurve:
    return tradeoff_curve(net, data, progress=False)


def inference_outcome(net, data, threshold):
    """What `early_exit` itself does at a threshold: exit counts, accuracy, mean cost."""
    exits, right, cost = [], [], []
    with torch.no_grad():
        for x, y in data:
            r = net.early_exit(x, threshold)
            exits.append(r.exit_index)
            right.append(r.logits.argmax(1) == y)
            cost.append(r.cost.double())
    exits = torch.cat(exits)
    counts = torch.bincount(exits, minlength=net.num_exits + 1).tolist()
    return counts, torch.cat(right).double().mean().item(), torch.cat(cost).mean().item()


def test_default_thresholds():
    assert 0.5 in DEFAULT_THRESHOLDS and DEFAULT_THRESHOLDS[0] == 0.0
    assert DEFAULT_THRESHOLDS[-1] > 1 and list(DEFAULT_THRESHOLDS) == sorted(DEFAULT_THRESHOLDS)


def _edges(net, data, thresholds, tol=1e-5) -> list[float]:
    """The thresholds that some sample's confidence is within `tol` of, at some exit.

    The curve reads `forward_all`; `early_exit` runs the stages with their norms folded, whose
    rounding differs by about 1e-6, so such a sample may leave on either side of T.
    """
    with torch.no_grad():
        h = torch.cat([torch.stack(net.forward_all(x).confidence_logits, 1) for x, _ in data])
    h = torch.sigmoid(h)
    return [t for t in thresholds if bool(((h - t).abs() < tol).any())]


def test_curve_equals_early_exit_inference(net, data, curve):
    assert curve.thresholds == list(DEFAULT_THRESHOLDS)
    assert curve.num_samples == 41
    assert len(curve.exit_counts) == len(DEFAULT_THRESHOLDS)
    edges = _edges(net, data, curve.thresholds)
    assert len(edges) <= 1, edges  # the fixture keeps samples off the thresholds but for one
    for t, acc, cost, counts in zip(
        curve.thresholds, curve.accuracy, curve.mean_cost, curve.exit_counts, strict=True
    ):
        if t in edges:
            continue
        expected_counts, expected_acc, expected_cost = inference_outcome(net, data, t)
        assert counts == expected_counts, t
        assert acc == pytest.approx(expected_acc, abs=1e-12)
        assert cost == pytest.approx(expected_cost, rel=1e-6)
    middle = curve.exit_counts[curve.thresholds.index(0.5)]
    assert all(0 < k < 41 for k in middle), "the fixture should spread samples over the exits"


def test_curve_ends(net, curve):
    assert curve.exit_counts[0] == [41, 0, 0, 0]
    assert curve.exit_counts[-1] == [0, 0, 0, 41]
    assert curve.accuracy[0] == pytest.approx(curve.exit_accuracy[0])
    assert curve.accuracy[-1] == pytest.approx(curve.reference_accuracy)
    assert curve.mean_cost[0] == pytest.approx(net.exit_costs[0].item(), rel=1e-6)
    assert curve.mean_cost[-1] == pytest.approx(net.exit_costs[-1].item(), rel=1e-6)
    assert curve.mean_cost == sorted(curve.mean_cost)


def test_one_forward_all_per_batch_and_mode_restored(data):
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2).train()
    running = net.backbone.bn1.running_mean.clone()
    calls = []
    forward_all = net.forward_all

    def counting(x):
        calls.append(x.shape[0])
        assert not net.training
        return forward_all(x)

    net.forward_all = counting
    net.early_exit = None  # never used
    tradeoff_curve(net, data, thresholds=[0.1, 0.5, 0.9], progress=False)
    assert calls == [16, 16, 9]
    assert net.training and net.heads[0].training
    torch.testing.assert_close(net.backbone.bn1.running_mean, running, rtol=0, atol=0)


def test_custom_thresholds_keep_their_order(net, data):
    c = tradeoff_curve(net, data, thresholds=[0.9, 0.1, 0.5, 0.5], progress=True)
    assert c.thresholds == [0.9, 0.1, 0.5, 0.5]
    assert c.exit_counts[2] == c.exit_counts[3]
    assert c.mean_cost[0] >= c.mean_cost[2] >= c.mean_cost[1]


def test_table_and_rows(curve):
    rows = curve.to_rows()
    assert len(rows) == len(curve.thresholds)
    assert set(rows[0]) == {"threshold", "accuracy", "mean_cost", "speedup", "exit_counts"}
    assert rows[-1]["speedup"] == pytest.approx(1.0)
    text = str(curve)
    assert "never" in text and "\n   0.5 " in text and "41 samples" in text


def brute_force(cache: ExitCache, threshold: float):
    """The curve at one threshold, one sample at a time, by `exit_mask`'s comparison.

    The cache holds h = sigmoid(a.float()), what `exit_mask` compares with the threshold.
    """
    conf = torch.from_numpy(cache.confidence)
    leave = conf >= threshold
    full = torch.cat([leave, torch.ones(len(conf), 1, dtype=torch.bool)], 1)
    exits = full.to(torch.uint8).argmax(1).numpy()
    right = cache.correct[np.arange(len(exits)), exits].mean()
    counts = np.bincount(exits, minlength=conf.shape[1] + 1)
    return right, counts @ cache.costs / len(exits), counts


def test_sweep_matches_exit_mask_at_every_observed_confidence(net, data):
    cache = collect_exit_cache(net, data, progress=False)
    observed = np.unique(cache.confidence)
    thresholds = np.concatenate([observed, [0.0, 0.5, 1.0, NEVER]]).astype(np.float32)
    acc, cost, counts = sweep_thresholds(cache, thresholds)
    for k, t in enumerate(thresholds.tolist()):
        b_acc, b_cost, b_counts = brute_force(cache, t)
        assert counts[k].tolist() == b_counts.tolist(), t
        assert acc[k] == b_acc and cost[k] == pytest.approx(b_cost, rel=1e-12)


confidences = arrays(
    np.float32,
    st.tuples(st.integers(1, 12), st.integers(1, 4)),
    elements=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.5000001, 0.75, 0.9999999, 1.0]),
)


@settings(max_examples=60, deadline=None)
@given(conf=confidences, seed=st.integers(0, 2**16), t=st.sampled_from([0.0, 0.25, 0.5, 1.0, 3.0]))
def test_sweep_property(conf, seed, t):
    rng = np.random.default_rng(seed)
    samples, n = conf.shape
    cache = ExitCache(
        confidence=conf,
        correct=rng.random((samples, n + 1)) < 0.5,
        costs=np.cumsum(rng.random(n + 1) + 0.1),
    )
    acc, cost, counts = sweep_thresholds(cache, np.array([t, 0.5], np.float32))
    b_acc, b_cost, b_counts = brute_force(cache, t)
    assert counts[0].tolist() == b_counts.tolist()
    assert acc[0] == b_acc and cost[0] == pytest.approx(b_cost, rel=1e-12)


def all_candidates(net, data):
    cache = collect_exit_cache(net, data, progress=False)
    thresholds = np.concatenate([np.unique(cache.confidence), [0.0, NEVER]]).astype(np.float32)
    acc, cost, _ = sweep_thresholds(cache, thresholds)
    return cache, acc, cost


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.6, 1.0])
def test_calibrate_target_cost(net, data, fraction):
    c0, cn = net.exit_costs[0].item(), net.exit_costs[-1].item()
    target = c0 + fraction * (cn - c0)
    before = net.threshold
    try:
        t = calibrate(net, data, target_cost=target, progress=False)
        assert net.threshold == t
        _, got_acc, got_cost = inference_outcome(net, data, t)
        assert got_cost <= target + 1e-6
        _, acc, cost = all_candidates(net, data)
        assert got_acc == pytest.approx(acc[cost <= target + 1e-9].max())
    finally:
        net.threshold = before


@pytest.mark.parametrize("drop", [0.0, 0.05, 0.2, 1.0])
def test_calibrate_accuracy_drop(net, data, curve, drop):
    before = net.threshold
    try:
        t = calibrate(net, data, max_accuracy_drop=drop, progress=False)
        _, got_acc, got_cost = inference_outcome(net, data, t)
        assert got_acc >= curve.reference_accuracy - drop - 1e-9
        _, acc, cost = all_candidates(net, data)
        feasible = acc >= curve.reference_accuracy - drop - 1e-9
        assert got_cost == pytest.approx(cost[feasible].min(), rel=1e-6)
        if drop == 1.0:
            assert got_cost == pytest.approx(net.exit_costs[0].item(), rel=1e-6)
    finally:
        net.threshold = before


def test_calibrated_threshold_sits_between_confidences(net, data):
    before = net.threshold
    try:
        t = calibrate(net, data, target_cost=net.exit_costs[1].item(), progress=False)
        cache = collect_exit_cache(net, data, progress=False)
        assert not np.any(cache.confidence == np.float32(t)) or t in (0.0, NEVER)
    finally:
        net.threshold = before


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "exactly one"),
        ({"target_cost": 0.5, "max_accuracy_drop": 0.01}, "exactly one"),
        ({"target_cost": 0.01}, "target_cost"),
        ({"target_cost": 1.5}, "target_cost"),
        ({"target_cost": float("nan")}, "target_cost"),
        ({"max_accuracy_drop": -0.1}, "max_accuracy_drop"),
        ({"max_accuracy_drop": 2.0}, "max_accuracy_drop"),
    ],
)
def test_calibrate_rejects_bad_budgets(net, data, kwargs, match):
    net.threshold = 0.5
    with pytest.raises(ValueError, match=match):
        calibrate(net, data, progress=False, **kwargs)
    assert net.threshold == 0.5


@pytest.mark.parametrize(
    ("loader", "error", "match"),
    [
        ([], ValueError, "no batches"),
        ([(torch.randn(4, 3, 28, 28), torch.zeros(4, dtype=torch.long))], ValueError, "shape"),
        ([(torch.randn(4, 3, 32, 32), torch.zeros(3, dtype=torch.long))], ValueError, "targets"),
        ([torch.randn(4, 3, 32, 32)], TypeError, r"\(x, y\)"),
    ],
    ids=["empty", "wrong_size", "wrong_targets", "no_pairs"],
)
def test_bad_data_raises_and_keeps_the_threshold(net, loader, error, match):
    net.threshold = 0.5
    with pytest.raises(error, match=match):
        calibrate(net, loader, target_cost=0.5, progress=False)
    with pytest.raises(error, match=match):
        tradeoff_curve(net, loader, progress=False)
    assert net.threshold == 0.5


def test_bad_thresholds(net, data):
    with pytest.raises(ValueError, match="threshold"):
        tradeoff_curve(net, data, thresholds=[-0.1], progress=False)
    with pytest.raises(TypeError, match="EarlyExitNet"):
        tradeoff_curve(torch.nn.Linear(2, 2), data, progress=False)


def test_plot_tradeoff(curve, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    path = tmp_path / "curve.png"
    ax = plot_tradeoff(curve, path=str(path))
    assert path.stat().st_size > 1000
    labels = ax.get_legend_handles_labels()[1]
    assert "T = 0.5 (paper)" in labels and "no early exit" in labels


def _two_scale_cache() -> ExitCache:
    """Exit 0 is right when h_0 > 0.8, exit 1 when h_1 > 0.3: no single T serves both."""
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, (400, 2)).astype(np.float32)
    correct = np.stack([conf[:, 0] > 0.8, conf[:, 1] > 0.3, np.ones(400, bool)], axis=1)
    return ExitCache(conf, correct, np.array([0.2, 0.5, 1.0]))


def test_exit_thresholds_beat_one_threshold_where_the_exits_differ():
    cache = _two_scale_cache()
    t = fit_exit_thresholds(cache, max_accuracy_drop=0.0)
    accuracy, cost, _ = score_exit_thresholds(cache, t)
    assert accuracy == 1.0
    assert 0.8 <= t[0] < 0.85 and 0.3 <= t[1] < 0.35  # on a grid of 64 quantiles
    # Every single threshold that keeps all the accuracy costs more.
    values = np.unique(np.concatenate([cache.confidence.ravel(), [0.0, NEVER]]))
    single_acc, single_cost, _ = sweep_thresholds(cache, values)
    assert cost < single_cost[single_acc >= 1.0].min() - 0.05


@pytest.mark.parametrize("target", [0.4, 0.6, 0.9])
def test_exit_thresholds_meet_a_cost_target_and_match_one_threshold_at_least(target):
    cache = _two_scale_cache()
    t = fit_exit_thresholds(cache, target_cost=target)
    accuracy, cost, counts = score_exit_thresholds(cache, t)
    assert cost <= target + 1e-9 and counts.sum() == 400
    values = np.unique(np.concatenate([cache.confidence.ravel(), [0.0, NEVER]]))
    single_acc, single_cost, _ = sweep_thresholds(cache, values)
    assert accuracy >= single_acc[single_cost <= target].max() - 0.01


def test_exit_thresholds_folded_into_the_net_give_the_exits_inference_takes(net, data):
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h = torch.sigmoid(torch.stack(net.forward_all(x).confidence_logits, 1))
    thresholds = [0.37, 0.0, 2.0]
    t = torch.tensor([0.37, 0.0, 3.0])
    leave = torch.cat([h >= t, torch.ones(len(x), 1, dtype=torch.bool)], 1)
    expected = leave.int().argmax(1)
    assert len(expected.unique()) >= 2
    before = net.early_exit(x, threshold=0.5)
    folded = copy.deepcopy(net)
    set_exit_thresholds(folded, thresholds)
    assert folded.threshold == net.threshold == 0.5
    with torch.no_grad():
        got = folded.early_exit(x)
    assert torch.equal(got.exit_index, expected)
    # Each sample's logits are those of the exit it left at, as before.
    with torch.no_grad():
        logits = torch.stack(net.forward_all(x).logits, 1)[torch.arange(len(x)), expected]
    torch.testing.assert_close(got.logits, logits)
    assert not torch.equal(before.exit_index, got.exit_index)


def test_calibrate_per_exit_meets_the_budget_on_its_data(net, data):
    folded = copy.deepcopy(net)
    t = calibrate(folded, data, target_cost=0.7, per_exit=True, progress=False)
    assert t == folded.threshold
    result = earlyexit.evaluate(folded, data, progress=False)
    assert result.cost <= 0.7 + 1e-6
    plain = copy.deepcopy(net)
    calibrate(plain, data, target_cost=0.7, progress=False)
    assert result.accuracy >= earlyexit.evaluate(plain, data, progress=False).accuracy - 0.03


def test_exit_threshold_errors(net):
    with pytest.raises(ValueError, match="one per early exit"):
        set_exit_thresholds(copy.deepcopy(net), [0.5])
    with pytest.raises(ValueError, match="exactly one"):
        fit_exit_thresholds(_two_scale_cache())
    with pytest.raises(ValueError, match="No thresholds meet"):
        fit_exit_thresholds(_two_scale_cache(), target_cost=0.1)
