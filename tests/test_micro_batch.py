"""CPU inference in micro-batches (`EarlyExitNet.micro_batch`).

A batch larger than the micro-batch runs through the stages that many samples at a time, with
refill queues between the stages. The invariant is `predict`'s: each sample's exit index,
logits and cost are what `net.early_exit` gives that sample alone.
"""

from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import earlyexit
from earlyexit.model import MICRO_BATCH_BYTES, MIN_MICRO_BATCH

from toy_models import spread_confidences

POOL = 40
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return torch.randn(POOL, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def net(pool) -> earlyexit.EarlyExitNet:
    """resnet20 with 3 exits whose confidences spread the pool over all four exits."""
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
    spread_confidences(net, pool)
    return net


@pytest.fixture(scope="module")
def alone(net, pool) -> earlyexit.EarlyExitResult:
    with torch.no_grad():
        results = [net.early_exit(pool[k : k + 1]) for k in range(POOL)]
    result = earlyexit.EarlyExitResult(*(torch.cat(parts) for parts in zip(*results)))
    counts = torch.bincount(result.exit_index, minlength=net.num_exits + 1)
    assert (counts >= 2).all(), counts  # every exit is used: the queues matter
    return result


def _stage_batches(net: earlyexit.EarlyExitNet) -> tuple[list[list[int]], list]:
    """Per stage, the batch sizes it runs at from now on, and the hooks to remove."""
    runs: list[list[int]] = [[] for _ in range(net.num_exits + 1)]

    def record(i):
        return lambda module, args: runs[i].append(args[0].shape[0])

    stages = net.staged.inference_stages()
    return runs, [s.register_forward_pre_hook(record(i)) for i, s in enumerate(stages)]


@pytest.mark.parametrize("micro", [1, 3, 7, 16, 39])
def test_each_sample_gets_its_result_alone_in_full_micro_batches(
    net, pool, alone, monkeypatch, micro
):
    monkeypatch.setattr(net, "micro_batch", micro)
    runs, hooks = _stage_batches(net)
    try:
        with torch.no_grad():
            result = net.early_exit(pool)
            logits = net(pool)
    finally:
        for h in hooks:
            h.remove()
    assert result.exit_index.tolist() == alone.exit_index.tolist()
    torch.testing.assert_close(result.logits, alone.logits, **TOL)
    torch.testing.assert_close(result.cost, alone.cost, rtol=0, atol=0)
    torch.testing.assert_close(logits, result.logits, rtol=0, atol=0)  # net(x) is early_exit
    exits = alone.exit_index.repeat(2)  # early_exit and net(x)
    for i, sizes in enumerate(runs):
        assert sum(sizes) == int((exits >= i).sum())  # the samples that reach stage i
        assert max(sizes) <= micro
        # full micro-batches, but for the one partial batch of the flush, per call
        assert sum(size != micro for size in sizes) <= 2, (i, sizes)


@settings(max_examples=20, deadline=None)
@given(micro=st.integers(1, POOL + 5), n=st.integers(1, POOL), seed=st.integers(0, 2**16))
def test_any_micro_batch_any_subset(net, pool, alone, micro, n, seed):
    index = torch.randperm(POOL, generator=torch.Generator().manual_seed(seed))[:n]
    old = net.micro_batch
    net.micro_batch = micro
    try:
        with torch.no_grad():
            result = net.early_exit(pool[index], threshold=net.threshold)
    finally:
        net.micro_batch = old
    assert result.exit_index.tolist() == alone.exit_index[index].tolist()
    torch.testing.assert_close(result.logits, alone.logits[index], **TOL)


def test_the_thresholds_still_decide(net, pool, monkeypatch):
    monkeypatch.setattr(net, "micro_batch", 6)
    with torch.no_grad():
        assert (net.early_exit(pool, threshold=0.0).exit_index == 0).all()
        never = net.early_exit(pool, threshold=2.0)
    assert (never.exit_index == net.num_exits).all()
    with torch.no_grad():
        full = net.forward_all(pool).logits[-1]
    torch.testing.assert_close(never.logits, full, **TOL)


def test_auto_keeps_the_largest_activation_within_the_budget(net, pool, monkeypatch):
    # resnet20's largest activation: 16 channels at 32 × 32, float32
    assert net.staged.activation_bytes == 16 * 32 * 32 * 4
    assert net.micro_batch is None  # the default: whole batches
    assert net.resolve_micro_batch(pool) is None
    monkeypatch.setattr(net, "micro_batch", "auto")
    assert net.resolve_micro_batch(pool) == MICRO_BATCH_BYTES // (16 * 32 * 32 * 4) == 64
    # a larger input: four times the activation, a quarter of the samples
    assert net.resolve_micro_batch(torch.zeros(2, 3, 64, 64)) == 16
    # never fewer than the minimum, however large the input
    assert net.resolve_micro_batch(torch.zeros(1, 3, 1024, 1024)) == MIN_MICRO_BATCH


def test_whole_batches_off_the_cpu_when_asked_and_in_train_mode(net, pool, monkeypatch):
    assert net.resolve_micro_batch(torch.zeros(2, 3, 32, 32, device="meta")) is None
    monkeypatch.setattr(net, "micro_batch", None)
    assert net.resolve_micro_batch(pool) is None
    monkeypatch.setattr(net, "micro_batch", 5)
    assert net.resolve_micro_batch(pool) == 5
    # a net of its own: a train-mode pass updates the norms' running statistics
    other = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).train()
    other.micro_batch = 5
    runs = []
    other.stages()[0].register_forward_pre_hook(lambda m, args: runs.append(args[0].shape[0]))
    other.early_exit(pool[:12])  # train-mode batch norm: the batch is its statistics
    assert runs == [12]
    # an eval-mode net with one norm left in train mode, too
    other.eval()
    next(m for m in other.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)).train()
    runs.clear()
    stage = other.staged.inference_stages()[0]
    stage.register_forward_pre_hook(lambda m, args: runs.append(args[0].shape[0]))
    other.early_exit(pool[:12])
    assert runs == [12]


def test_predict_runs_at_most_the_micro_batch(net, pool, alone, monkeypatch):
    monkeypatch.setattr(net, "micro_batch", 4)
    runs, hooks = _stage_batches(net)
    try:
        pred = earlyexit.predict(net, pool.split(10), batch_size=16, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert max(max(sizes) for sizes in runs) == 4
    assert pred.exit_index.tolist() == alone.exit_index.tolist()
    torch.testing.assert_close(pred.logits, alone.logits, **TOL)


@pytest.mark.parametrize(
    "value, error, match",
    [
        (0, ValueError, r"positive int.*Hint: None runs whole batches"),
        (-3, ValueError, "positive int"),
        (2.5, TypeError, r"positive int.*Hint: \"auto\" sizes it"),
        (True, TypeError, "positive int"),
        ("big", TypeError, "positive int"),
    ],
)
def test_bad_micro_batches_are_clear_errors_and_change_nothing(net, value, error, match):
    with pytest.raises(error, match=match):
        net.micro_batch = value
    assert net.micro_batch is None


def test_the_setting_survives_copies_but_not_files(net, tmp_path, monkeypatch):
    import copy

    monkeypatch.setattr(net, "micro_batch", 8)
    assert copy.deepcopy(net).micro_batch == 8
    older = copy.deepcopy(net)
    del older.__dict__["_micro_batch"]  # as a net pickled before the setting existed
    assert older.micro_batch is None
    path = tmp_path / "net.safetensors"
    earlyexit.save(net, path)
    assert earlyexit.load(path, backbone=timm.create_model("resnet20")).micro_batch is None
