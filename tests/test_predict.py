"""`earlyexit.predict`: streaming early-exit inference with per-stage refill queues.

The invariant: each sample's exit index, logits and cost are what `net.early_exit` gives for
that sample alone, whatever the batch size, the order and the batching of the stream. The net's
confidence branches are rescaled so that the samples spread over every exit.

Run as a script under torchrun, this file is the worker of the two-rank test.
"""

from __future__ import annotations

import doctest
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, TensorDataset

import earlyexit
import earlyexit._pipeline
import earlyexit.stream
from earlyexit.stream import Prediction

from toy_models import decisive_confidences, spread_resnet20

POOL = 40  # samples the streams are drawn from
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _make_net() -> earlyexit.EarlyExitNet:
    """resnet20 with 3 exits whose confidences spread the pool over all four exits."""
    return spread_resnet20(_pool())


def _pool() -> torch.Tensor:
    return torch.randn(POOL, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def net() -> earlyexit.EarlyExitNet:
    return _make_net()


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return _pool()


@pytest.fixture(scope="module")
def alone(net, pool) -> earlyexit.EarlyExitResult:
    """Each pool sample's `early_exit` result, computed on that sample alone."""
    with torch.no_grad():
        results = [net.early_exit(pool[k : k + 1]) for k in range(POOL)]
    return earlyexit.EarlyExitResult(*(torch.cat(parts) for parts in zip(*results)))


def _batches(x: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    assert sum(sizes) == len(x)
    return list(x.split(sizes))


def _check_against_alone(pred: Prediction, alone, index: torch.Tensor, tol: dict = TOL) -> None:
    assert pred.exit_index.tolist() == alone.exit_index[index].tolist()
    torch.testing.assert_close(pred.logits, alone.logits[index], **tol)
    torch.testing.assert_close(pred.cost, alone.cost[index], rtol=0, atol=0)


def test_the_net_spreads_samples_over_every_exit(net, alone):
    counts = torch.bincount(alone.exit_index, minlength=net.num_exits + 1)
    assert (counts >= 2).all(), counts


SHUFFLED = torch.randperm(POOL, generator=torch.Generator().manual_seed(2)).tolist()
STREAMS = {  # sample order, batch sizes
    "even": (list(range(POOL)), [8] * 5),
    "uneven": (list(range(POOL)), [5, 11, 1, 9, 14]),
    "shuffled": (SHUFFLED, [13, 13, 13, 1]),
    "one sample": ([17], [1]),
    "empty batches": (list(range(10)), [0, 4, 0, 0, 6, 0]),
}


@pytest.mark.parametrize("batch_size", [1, 3, 7, 64])
@pytest.mark.parametrize("stream", STREAMS, ids=str)
def test_each_sample_gets_its_result_alone(net, pool, alone, stream, batch_size):
    order, sizes = STREAMS[stream]
    index = torch.tensor(order)
    pred = earlyexit.predict(net, _batches(pool[index], sizes), batch_size=batch_size)
    _check_against_alone(pred, alone, index)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, POOL),
    seed=st.integers(0, 2**16),
    cuts=st.lists(st.integers(0, 12), max_size=8),
    batch_size=st.none() | st.integers(1, 12),
)
def test_any_stream_any_batch_size(net, pool, alone, n, seed, cuts, batch_size):
    index = torch.randperm(POOL, generator=torch.Generator().manual_seed(seed))[:n]
    sizes, left = [], n
    for cut in cuts:  # batches of the drawn sizes (empty ones too), the rest in a last one
        sizes.append(min(cut, left))
        left -= sizes[-1]
    sizes += [left] if left else []
    pred = earlyexit.predict(net, _batches(pool[index], sizes), batch_size=batch_size)
    _check_against_alone(pred, alone, index)


def test_the_default_batch_size_is_the_first_batch(net, pool, monkeypatch):
    sizes = []
    run = earlyexit._pipeline.run_exit

    def spy(stage, head, x, ids, threshold):
        sizes.append(x.shape[0])
        return run(stage, head, x, ids, threshold)

    monkeypatch.setattr(earlyexit._pipeline, "run_exit", spy)
    earlyexit.predict(net, [pool[:0], pool[:6], pool[6:40]])
    assert max(sizes) == 6


@pytest.mark.parametrize("batch_size, input_batch", [(4, 5), (3, 32), (16, 1)])
def test_stages_run_full_batches_and_queues_stay_bounded(
    net, pool, alone, monkeypatch, batch_size, input_batch
):
    pipelines = []

    class Recording(earlyexit.stream.Pipeline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            pipelines.append(self)

    monkeypatch.setattr(earlyexit.stream, "Pipeline", Recording)
    runs: list[list[int]] = [[] for _ in range(net.num_exits + 1)]

    def record(i):
        def hook(module, args):
            assert torch.is_inference_mode_enabled()
            runs[i].append(args[0].shape[0])

        return hook

    hooks = [
        s.register_forward_pre_hook(record(i))
        for i, s in enumerate(net.staged.inference_stages(chained=True))
    ]
    try:
        x = pool.repeat(3, 1, 1, 1)  # a longer stream: 120 samples
        earlyexit.predict(net, x.split(input_batch), batch_size=batch_size)
    finally:
        for h in hooks:
            h.remove()
    exits = alone.exit_index.repeat(3)
    for i, sizes in enumerate(runs):
        # Each stage sees exactly the samples that did not leave before it ...
        assert sum(sizes) == int((exits >= i).sum())
        # ... in full batches, but for one partial batch when the queues are flushed.
        assert sum(size != batch_size for size in sizes) <= 1, (i, sizes)
    (pipeline,) = pipelines
    peaks = [q.peak for q in pipeline.queues]
    assert peaks[0] < batch_size + input_batch, peaks
    assert all(peak < 2 * batch_size for peak in peaks[1:]), peaks
    assert all(q.size == 0 for q in pipeline.queues)


def test_labelled_data_give_targets_and_accuracy(net, pool, alone):
    generator = torch.Generator().manual_seed(3)
    targets = torch.randint(0, 10, (POOL,), generator=generator)
    targets[::2] = alone.logits.argmax(dim=1)[::2]  # about half right, for a telling accuracy
    loader = DataLoader(TensorDataset(pool, targets), batch_size=6)
    pred = earlyexit.predict(net, loader, batch_size=4)
    expected = (alone.logits.argmax(dim=1) == targets).double().mean().item()
    assert 0.4 < expected < 1
    assert pred.accuracy == pytest.approx(expected, abs=1e-12)
    assert torch.equal(pred.targets, targets)
    _check_against_alone(pred, alone, torch.arange(POOL))


def test_inputs_only_loader_gives_no_accuracy(net, pool, alone):
    pred = earlyexit.predict(net, DataLoader(TensorDataset(pool), batch_size=16), batch_size=5)
    assert pred.targets is None and pred.accuracy is None
    _check_against_alone(pred, alone, torch.arange(POOL))


def test_prediction_is_on_the_cpu_in_input_order(net, pool, alone):
    pred = earlyexit.predict(net, [pool[:25], pool[25:]], batch_size=8, device="cpu")
    assert isinstance(pred, Prediction)
    assert pred.num_samples == POOL
    assert pred.logits.shape == (POOL, net.num_classes) and pred.logits.dtype == torch.float32
    assert pred.exit_index.dtype == torch.long and pred.cost.dtype == net.exit_costs.dtype
    for t in pred.result:
        assert t.device.type == "cpu"
        assert not t.is_inference()  # ordinary tensors: usable with autograd and in place
    assert isinstance(pred.result, earlyexit.EarlyExitResult)
    assert pred.mean_cost == pytest.approx(alone.cost.double().mean().item())
    assert repr(pred).startswith(f"Prediction(num_samples={POOL}, accuracy=None, mean_cost=")


def test_thresholds(net, pool):
    stream = pool.split(7)
    everyone = earlyexit.predict(net, stream, batch_size=5, threshold=0.0)
    assert everyone.exit_index.tolist() == [0] * POOL
    nobody = earlyexit.predict(net, stream, batch_size=5, threshold=2.0)
    assert nobody.exit_index.tolist() == [net.num_exits] * POOL
    with torch.no_grad():
        torch.testing.assert_close(nobody.logits, net.backbone(pool), **TOL)
    net.threshold, saved = 0.3, net.threshold
    try:
        with torch.no_grad():
            expected = net.early_exit(pool)
        pred = earlyexit.predict(net, stream, batch_size=5)  # threshold=None: the net's own
    finally:
        net.threshold = saved
    assert pred.exit_index.tolist() == expected.exit_index.tolist()
    torch.testing.assert_close(pred.logits, expected.logits, **TOL)


def test_progress_bar_stays_off_without_a_terminal(net, pool, capsys):
    earlyexit.predict(net, pool.split(8), progress=True)
    assert capsys.readouterr().err == ""


def _generator_that_fails(pool):
    yield pool[:8]
    yield pool[8:16]
    raise OSError("the disk went away")


def test_a_failing_stream_raises_instead_of_returning_part(net, pool):
    with pytest.raises(OSError, match="disk went away"):
        earlyexit.predict(net, _generator_that_fails(pool), batch_size=3)


BAD_INPUTS = {
    "no batches": (lambda x, y: [], {}, ValueError, "at least one sample"),
    "empty batches": (lambda x, y: [x[:0], x[:0]], {}, ValueError, "at least one sample"),
    "one tensor": (lambda x, y: x, {}, TypeError, "single tensor"),
    "wrong shape": (
        lambda x, y: [x, x, x[:2, :, :16, :16]],
        {},
        ValueError,
        r"batch 2 .*\(B, 3, 32, 32\).*Hint",
    ),
    "integers": (
        lambda x, y: [x, (x * 255).to(torch.uint8)],
        {},
        TypeError,
        r"batch 1 .*uint8.*Hint",
    ),
    "a dict": (lambda x, y: [x, {"x": x}], {}, TypeError, r"batch 1 .*dict.*Hint"),
    "targets then none": (lambda x, y: [(x, y), x], {}, TypeError, r"batch 1 has no targets.*Hint"),
    "none then targets": (lambda x, y: [x, (x, y)], {}, TypeError, r"batch 1 has targets.*Hint"),
    "too few targets": (lambda x, y: [(x, y[:3])], {}, ValueError, r"one target per input.*Hint"),
    "batch_size 0": (lambda x, y: [x], {"batch_size": 0}, ValueError, "positive int"),
    "batch_size float": (lambda x, y: [x], {"batch_size": 2.0}, TypeError, "positive int"),
    "batch_size bool": (lambda x, y: [x], {"batch_size": True}, TypeError, "positive int"),
    "threshold": (lambda x, y: [x], {"threshold": -0.5}, ValueError, "threshold"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_inputs_are_clear_errors(net, pool, case):
    make, kwargs, error, match = BAD_INPUTS[case]
    data = make(pool[:4], torch.zeros(4, dtype=torch.long))
    with pytest.raises(error, match=match):
        earlyexit.predict(net, data, **kwargs)


def test_train_mode_and_other_models_are_refused(net, pool):
    net.train()
    try:
        with pytest.raises(ValueError, match=r"train mode.*Hint: call `net.eval\(\)`"):
            earlyexit.predict(net, [pool[:4]])
    finally:
        net.eval()
    with pytest.raises(TypeError, match="EarlyExitNet"):
        earlyexit.predict(net.backbone, [pool[:4]])


def test_docstring_examples_run():
    result = doctest.testmod(earlyexit.stream, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


@pytest.mark.gpu
def test_cuda_net_with_cpu_inputs(pool, monkeypatch):
    # TF32 would make the batched and the per-sample results differ by more than float noise.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    net = _make_net()
    # Confidences that vary with the features: the spread of the untrained prior alone is
    # scaled by hundreds, and cuDNN's kernels for batches of 4 and of 1 round differently.
    decisive_confidences(net, pool)
    net.cuda()
    with torch.no_grad():
        results = [net.early_exit(pool[k : k + 1].cuda()) for k in range(POOL)]
    alone = earlyexit.EarlyExitResult(*(torch.cat(parts).cpu() for parts in zip(*results)))
    pred = earlyexit.predict(net, pool.split(6), batch_size=4)  # CPU inputs go to the GPU
    assert all(t.device.type == "cpu" for t in pred.result)
    _check_against_alone(pred, alone, torch.arange(POOL), tol={"rtol": 1e-4, "atol": 1e-4})


# Two ranks: 23 samples in uneven batches, so that rank 0 runs 12 samples and rank 1 runs 11.
DIST_SIZES = [5, 0, 7, 3, 8]
DIST_SAMPLES = sum(DIST_SIZES)


def _dist_stream(pool: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    targets = torch.arange(DIST_SAMPLES) % 10
    return list(zip(pool[:DIST_SAMPLES].split(DIST_SIZES), targets.split(DIST_SIZES)))


def _dist_worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank = dist.get_rank()
        pred = earlyexit.predict(_make_net(), _dist_stream(_pool()), batch_size=3, progress=False)
        fields = {k: getattr(pred, k) for k in ["logits", "exit_index", "cost", "targets"]}
        torch.save({**fields, "accuracy": pred.accuracy}, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_torchrun_two_ranks_gather_on_rank_0(net, pool, alone, tmp_path):
    from test_examples import _torchrun  # how the examples run under torchrun, on gloo

    _torchrun(Path(__file__), str(tmp_path), cwd=tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    single = earlyexit.predict(net, _dist_stream(pool), batch_size=3)
    targets = torch.arange(DIST_SAMPLES) % 10
    # Rank 0: everything, in stream order.
    assert ranks[0]["exit_index"].tolist() == alone.exit_index[:DIST_SAMPLES].tolist()
    torch.testing.assert_close(ranks[0]["logits"], alone.logits[:DIST_SAMPLES], **TOL)
    torch.testing.assert_close(ranks[0]["cost"], single.cost, rtol=0, atol=0)
    assert torch.equal(ranks[0]["targets"], targets)
    assert ranks[0]["accuracy"] == pytest.approx(single.accuracy, abs=1e-12)
    # Rank 1: its own samples, 1, 3, 5, ...
    assert ranks[1]["exit_index"].tolist() == alone.exit_index[1:DIST_SAMPLES:2].tolist()
    torch.testing.assert_close(ranks[1]["logits"], alone.logits[1:DIST_SAMPLES:2], **TOL)
    assert torch.equal(ranks[1]["targets"], targets[1::2])


if __name__ == "__main__":
    _dist_worker(Path(sys.argv[1]))
