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

from toy_models import SPREAD_POOL

TOL = {"rtol": 1e-5, "atol": 1e-5}


def _stage_batches(spread_net: earlyexit.EarlyExitNet) -> tuple[list[list[int]], list]:
    """Per stage, the batch sizes it runs at from now on, and the hooks to remove."""
    runs: list[list[int]] = [[] for _ in range(spread_net.num_exits + 1)]

    def record(i):
        return lambda module, args: runs[i].append(args[0].shape[0])

    stages = spread_net.staged.inference_stages(chained=True)  # those early exit runs
    return runs, [s.register_forward_pre_hook(record(i)) for i, s in enumerate(stages)]


@pytest.mark.parametrize("micro", [1, 3, 7, 16, 39])
def test_each_sample_gets_its_result_alone_in_full_micro_batches(
    spread_net, spread_pool, spread_alone, monkeypatch, micro
):
    monkeypatch.setattr(spread_net, "micro_batch", micro)
    runs, hooks = _stage_batches(spread_net)
    try:
        with torch.no_grad():
            result = spread_net.early_exit(spread_pool)
            logits = spread_net(spread_pool)
    finally:
        for h in hooks:
            h.remove()
    assert result.exit_index.tolist() == spread_alone.exit_index.tolist()
    torch.testing.assert_close(result.logits, spread_alone.logits, **TOL)
    torch.testing.assert_close(result.cost, spread_alone.cost, rtol=0, atol=0)
    torch.testing.assert_close(logits, result.logits, rtol=0, atol=0)  # net(x) is early_exit
    exits = spread_alone.exit_index.repeat(2)  # early_exit and net(x)
    for i, sizes in enumerate(runs):
        assert sum(sizes) == int((exits >= i).sum())  # the samples that reach stage i
        assert max(sizes) <= micro
        # full micro-batches, but for the one partial batch of the flush, per call
        assert sum(size != micro for size in sizes) <= 2, (i, sizes)


@settings(max_examples=20, deadline=None)
@given(
    micro=st.integers(1, SPREAD_POOL + 5), n=st.integers(1, SPREAD_POOL), seed=st.integers(0, 2**16)
)
def test_any_micro_batch_any_subset(spread_net, spread_pool, spread_alone, micro, n, seed):
    index = torch.randperm(SPREAD_POOL, generator=torch.Generator().manual_seed(seed))[:n]
    old = spread_net.micro_batch
    spread_net.micro_batch = micro
    try:
        with torch.no_grad():
            result = spread_net.early_exit(spread_pool[index], threshold=spread_net.threshold)
    finally:
        spread_net.micro_batch = old
    assert result.exit_index.tolist() == spread_alone.exit_index[index].tolist()
    torch.testing.assert_close(result.logits, spread_alone.logits[index], **TOL)


def test_the_thresholds_still_decide(spread_net, spread_pool, monkeypatch):
    monkeypatch.setattr(spread_net, "micro_batch", 6)
    with torch.no_grad():
        assert (spread_net.early_exit(spread_pool, threshold=0.0).exit_index == 0).all()
        never = spread_net.early_exit(spread_pool, threshold=2.0)
    assert (never.exit_index == spread_net.num_exits).all()
    with torch.no_grad():
        full = spread_net.forward_all(spread_pool).logits[-1]
    torch.testing.assert_close(never.logits, full, **TOL)


def test_auto_keeps_the_largest_activation_within_the_budget(spread_net, spread_pool, monkeypatch):
    # resnet20's largest activation: 16 channels at 32 × 32
    assert spread_net.staged.activation_elements == 16 * 32 * 32
    assert spread_net.micro_batch is None  # the default: whole batches
    assert spread_net.resolve_micro_batch(spread_pool) is None
    monkeypatch.setattr(spread_net, "micro_batch", "auto")
    assert (
        spread_net.resolve_micro_batch(spread_pool) == MICRO_BATCH_BYTES // (16 * 32 * 32 * 4) == 64
    )
    # a larger input: four times the activation, a quarter of the samples
    assert spread_net.resolve_micro_batch(torch.zeros(2, 3, 64, 64)) == 16
    # never fewer than the minimum, however large the input
    assert spread_net.resolve_micro_batch(torch.zeros(1, 3, 1024, 1024)) == MIN_MICRO_BATCH
    # in the dtype the run computes in: bfloat16 activations take half the bytes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert spread_net.resolve_micro_batch(spread_pool) == 128
    assert spread_net.resolve_micro_batch(spread_pool.double()) == 32


def test_whole_batches_off_the_cpu_when_asked_and_in_train_mode(
    spread_net, spread_pool, monkeypatch
):
    assert spread_net.resolve_micro_batch(torch.zeros(2, 3, 32, 32, device="meta")) is None
    monkeypatch.setattr(spread_net, "micro_batch", None)
    assert spread_net.resolve_micro_batch(spread_pool) is None
    monkeypatch.setattr(spread_net, "micro_batch", 5)
    assert spread_net.resolve_micro_batch(spread_pool) == 5
    # a spread_net of its own: a train-mode pass updates the norms' running statistics
    other = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).train()
    other.micro_batch = 5
    runs = []
    other.stages()[0].register_forward_pre_hook(lambda m, args: runs.append(args[0].shape[0]))
    other.early_exit(spread_pool[:12])  # train-mode batch norm: the batch is its statistics
    assert runs == [12]
    # an eval-mode spread_net with one norm left in train mode, too
    other.eval()
    next(m for m in other.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)).train()
    runs.clear()
    stage = other.staged.inference_stages(chained=True)[0]
    stage.register_forward_pre_hook(lambda m, args: runs.append(args[0].shape[0]))
    other.early_exit(spread_pool[:12])
    assert runs == [12]


def test_predict_runs_at_most_the_micro_batch(spread_net, spread_pool, spread_alone, monkeypatch):
    monkeypatch.setattr(spread_net, "micro_batch", 4)
    runs, hooks = _stage_batches(spread_net)
    try:
        pred = earlyexit.predict(spread_net, spread_pool.split(10), batch_size=16, progress=False)
    finally:
        for h in hooks:
            h.remove()
    assert max(max(sizes) for sizes in runs) == 4
    assert pred.exit_index.tolist() == spread_alone.exit_index.tolist()
    torch.testing.assert_close(pred.logits, spread_alone.logits, **TOL)


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
def test_bad_micro_batches_are_clear_errors_and_change_nothing(spread_net, value, error, match):
    with pytest.raises(error, match=match):
        spread_net.micro_batch = value
    assert spread_net.micro_batch is None


def test_the_setting_survives_copies_but_not_files(spread_net, tmp_path, monkeypatch):
    import copy

    monkeypatch.setattr(spread_net, "micro_batch", 8)
    assert copy.deepcopy(spread_net).micro_batch == 8
    older = copy.deepcopy(spread_net)
    del older.__dict__["_micro_batch"]  # as a spread_net pickled before the setting existed
    assert older.micro_batch is None
    path = tmp_path / "spread_net.safetensors"
    earlyexit.save(spread_net, path)
    assert earlyexit.load(path, backbone=timm.create_model("resnet20")).micro_batch is None
