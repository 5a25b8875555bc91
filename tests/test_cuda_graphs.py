"""CUDA graphs, the part a CPU can check: the padding around the steps, and the errors.

`GraphedEarlyExit` pads each batch to a captured batch size and runs steps on static buffers;
here the same padding runs around the same steps executed eagerly (`cuda_graphs._eager`), and
around steps that, as graphs do, write every run's results into the same output tensors
(`_replaying`), so every sample's result can be compared with `net.early_exit` on that sample
alone. That the graphs replay exactly these steps is checked on a GPU, in test_cuda.py.
"""

from __future__ import annotations

import pytest
import timm
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import earlyexit
import earlyexit.stream
from earlyexit._head_folding import InferenceHead
from earlyexit.cuda_graphs import (
    CudaGraphError,
    GraphedEarlyExit,
    _check_net,
    _eager,
    _Steps,
    bucket_sizes,
    capture_cuda_graphs,
)
from earlyexit.fx._fold import FoldedConvBN
from earlyexit.inference import exit_mask

from toy_models import ToyNet, results_alone, spread_resnet20

POOL = 40
TOL = {"rtol": 1e-5, "atol": 1e-5}


class _Replaying(_Steps):
    """Steps that, as replayed graphs do, write each run's results into the same tensors."""

    def __init__(self, *args, **kwargs) -> None:
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        super().__init__(*args, **kwargs)

    def _prepare(self, i: int, b: int) -> None:
        self.outputs[i, b] = self._step(i, b)

    def run(self, i: int, b: int) -> tuple[torch.Tensor, ...]:
        for kept, new in zip(self.outputs[i, b], self._step(i, b), strict=True):
            kept.copy_(new)
        return self.outputs[i, b]


def _replaying(net, batch_sizes) -> GraphedEarlyExit:
    _check_net(net)
    return GraphedEarlyExit(net, _Replaying(net, bucket_sizes(batch_sizes)))


STEPS = {"eager": _eager, "replaying": _replaying}


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    return torch.randn(POOL, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def net(pool) -> earlyexit.EarlyExitNet:
    return spread_resnet20(pool)


@pytest.fixture(scope="module")
def alone(net, pool) -> earlyexit.EarlyExitResult:
    """Each pool sample's `early_exit` result, computed on that sample alone."""
    return results_alone(net, pool)


def _check(out: earlyexit.EarlyExitResult, alone, index) -> None:
    assert out.exit_index.tolist() == alone.exit_index[index].tolist()
    torch.testing.assert_close(out.logits, alone.logits[index], **TOL)
    torch.testing.assert_close(out.cost, alone.cost[index], rtol=0, atol=0)


@pytest.mark.parametrize(
    "batch_sizes, expected",
    [(1, (1,)), (6, (1, 2, 4, 6)), (8, (1, 2, 4, 8)), ([8, 3, 3], (3, 8)), ((5,), (5,))],
)
def test_bucket_sizes(batch_sizes, expected):
    assert bucket_sizes(batch_sizes) == expected


@pytest.mark.parametrize(
    "batch_sizes, error",
    [
        (0, ValueError),
        (-4, ValueError),
        ([], ValueError),
        ([4, 0], ValueError),
        (True, TypeError),
        (2.0, TypeError),
        ([4, "8"], TypeError),
    ],
)
def test_bad_bucket_sizes(batch_sizes, error):
    with pytest.raises(error, match="batch_sizes"):
        bucket_sizes(batch_sizes)


def test_the_pool_reaches_every_exit(net, alone):
    counts = torch.bincount(alone.exit_index, minlength=net.num_exits + 1)
    assert (counts >= 2).all(), counts


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("batch_sizes", [16, (3, 7), (40,)], ids=str)
def test_padded_steps_give_each_sample_its_result_alone(net, pool, alone, batch_sizes, steps):
    runner = STEPS[steps](net, batch_sizes)
    order = torch.randperm(POOL, generator=torch.Generator().manual_seed(2))
    for n in (1, 2, 5, 11, 17, 40):  # uneven sizes; above the largest size: in slices
        index = order[:n]
        _check(runner(pool[index]), alone, index)


@pytest.mark.parametrize("steps", STEPS)
def test_whatever_the_padding_rows_hold(net, pool, alone, steps):
    runner = STEPS[steps](net, (8, 32))
    for value in (float("nan"), 1e30, 0.0):
        for buffer in runner._steps.inputs:
            buffer.fill_(value)
        _check(runner(pool[3:12]), alone, torch.arange(3, 12))  # 9 of 32 rows are real


def test_results_are_shaped_as_early_exit_gives_them(net, pool):
    runner = _eager(net, 4)
    with torch.no_grad():
        expected = net.early_exit(pool[:6])
    out = runner.early_exit(pool[:6])
    assert isinstance(out, earlyexit.EarlyExitResult)
    for got, want in zip(out, expected, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        assert not got.requires_grad
    empty = runner(pool[:0])
    assert empty.logits.shape == (0, net.num_classes) and empty.exit_index.shape == (0,)
    with torch.inference_mode():  # as `predict` runs it
        _ = runner(pool[:6])


def test_threshold_changes_without_rebuilding_the_steps(net, pool, monkeypatch):
    runner = _eager(net, 16)
    steps = runner._steps
    threshold = steps.threshold
    prepared = []
    monkeypatch.setattr(type(steps), "_prepare", lambda self, i, b: prepared.append((i, b)))
    saved = net.threshold
    try:
        for t in (0.0, 0.3, 0.7, 2.0):
            with torch.no_grad():
                expected = net.early_exit(pool, threshold=t)
            for out in (runner(pool, threshold=t), _with_net_threshold(net, runner, pool, t)):
                assert out.exit_index.tolist() == expected.exit_index.tolist()
                torch.testing.assert_close(out.logits, expected.logits, **TOL)
    finally:
        net.threshold = saved
    assert prepared == [] and steps.threshold is threshold
    assert runner(pool, threshold=0.0).exit_index.tolist() == [0] * POOL
    assert runner(pool, threshold=2.0).exit_index.tolist() == [net.num_exits] * POOL


def _with_net_threshold(net, runner, x, t):
    net.threshold = t
    return runner(x)


@settings(max_examples=50, deadline=None)
@given(
    t=st.floats(0.0, 1.0),
    steps=st.lists(st.integers(-3, 3), min_size=1, max_size=16),
)
def test_a_threshold_tensor_is_the_same_rule_as_the_float(t, steps):
    # Confidences right at T, and a few float32 steps either side of it.
    h = torch.tensor(t, dtype=torch.float32).repeat(len(steps))
    for k, s in enumerate(steps):
        for _ in range(abs(s)):
            h[k] = torch.nextafter(h[k], torch.tensor(1.0 if s > 0 else 0.0))
    a = torch.logit(h.double()).float()  # confidence logits whose sigmoid lands near T
    expected = exit_mask(a, t)
    assert torch.equal(exit_mask(a, torch.tensor(t, dtype=torch.float32)), expected)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("batch_size, input_batch", [(4, 5), (7, 3), (16, 40)])
def test_predict_with_padded_steps_keeps_order_and_one_batch_size(
    net, pool, alone, monkeypatch, batch_size, input_batch, steps
):
    monkeypatch.setattr(earlyexit.stream, "capture_cuda_graphs", STEPS[steps])
    runs: list[list[int]] = [[] for _ in range(net.num_exits + 1)]
    hooks = [
        s.register_forward_pre_hook(lambda m, args, i=i: runs[i].append(args[0].shape[0]))
        for i, s in enumerate(net.staged.inference_stages())
    ]
    order = torch.randperm(POOL, generator=torch.Generator().manual_seed(3))
    try:
        pred = earlyexit.predict(
            net, pool[order].split(input_batch), batch_size=batch_size, cuda_graphs=True
        )
    finally:
        for h in hooks:
            h.remove()
    _check(pred.result, alone, order)
    eager = earlyexit.predict(net, pool[order].split(input_batch), batch_size=batch_size)
    assert torch.equal(pred.exit_index, eager.exit_index)
    # Every stage ran at `batch_size`, tails too: they were padded.
    assert {size for sizes in runs for size in sizes} == {batch_size}


@pytest.mark.parametrize("steps", sorted(STEPS))
def test_predict_reuses_given_graphs_over_calls(net, pool, alone, monkeypatch, steps):
    runner = STEPS[steps](net, 16)  # sizes 1, 2, 4, 8, 16
    captures = []
    monkeypatch.setattr(earlyexit.stream, "capture_cuda_graphs", lambda *a: captures.append(a))
    order = torch.randperm(POOL, generator=torch.Generator().manual_seed(4))
    for batch_size in (16, 8):  # any batch size the runner holds
        pred = earlyexit.predict(
            net, pool[order].split(12), batch_size=batch_size, cuda_graphs=runner
        )
        _check(pred.result, alone, order)
    assert captures == []  # nothing captured again


def test_given_graphs_must_fit_the_net_and_the_batch(net, pool):
    runner = _eager(net, 8)
    with pytest.raises(ValueError, match=r"at most 8 .*Hint: capture them"):
        earlyexit.predict(net, pool.split(16), batch_size=16, cuda_graphs=runner)
    torch.manual_seed(0)
    other = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
    with pytest.raises(ValueError, match="graphs of another net"):
        earlyexit.predict(other, pool.split(8), cuda_graphs=runner)
    toy = _toy()
    moved = _eager(toy, 4)
    toy.double()
    with pytest.raises(CudaGraphError, match="parameters moved"):
        earlyexit.predict(toy, [torch.randn(3, 3, 16, 16).double()], cuda_graphs=moved)


def test_cpu_net_is_a_clear_error(net, pool):
    for call in (
        lambda: capture_cuda_graphs(net, 8),
        lambda: earlyexit.predict(net, pool.split(8), cuda_graphs=True),
    ):
        with pytest.raises(CudaGraphError, match=r"need a CUDA device; the net is on cpu.*Hint"):
            call()
    assert issubclass(CudaGraphError, RuntimeError)
    assert issubclass(CudaGraphError, earlyexit.EarlyExitError)


def test_bad_arguments_are_clear_errors(net, pool):
    with pytest.raises(TypeError, match="`cuda_graphs` to be a bool or the runner"):
        earlyexit.predict(net, pool.split(8), cuda_graphs="yes")
    with pytest.raises(TypeError, match="EarlyExitNet"):
        capture_cuda_graphs(net.backbone, 8)
    runner = _eager(net, 4)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\).*Hint"):
        runner(pool[:2, :, :16, :16])
    with pytest.raises(ValueError, match="threshold"):
        runner(pool[:2], threshold=-1.0)
    net.train()
    try:
        for call in (lambda: capture_cuda_graphs(net, 8), lambda: runner(pool[:2])):
            with pytest.raises(ValueError, match=r"train mode.*Hint: call `net.eval\(\)`"):
                call()
    finally:
        net.eval()


def _toy(bn: nn.Module | None = None) -> earlyexit.EarlyExitNet:
    torch.manual_seed(0)
    model = ToyNet()
    if bn is not None:
        model.blocks[1].bn = bn
    return earlyexit.convert(model, n_exits=2, input_size=(3, 16, 16)).eval()


def test_batch_statistics_are_refused():
    net = _toy(nn.BatchNorm2d(8, track_running_stats=False))
    with pytest.raises(CudaGraphError, match=r"`backbone.blocks.1.bn` is a BatchNorm2d.*Hint"):
        _eager(net, 4)


def test_a_compiled_net_is_refused_before_any_capture():
    net = _toy().compile()
    with pytest.raises(CudaGraphError, match=r"compiled.*Hint: capture a net that is not"):
        _eager(net, 4)


def test_moved_parameters_are_refused():
    net = _toy()
    runner = _eager(net, 4)
    x = torch.randn(3, 3, 16, 16)
    runner(x)
    net.double()
    with pytest.raises(CudaGraphError, match=r"parameters moved.*Hint: capture again"):
        runner(x.double())


def test_the_first_buffer_is_in_the_layout_the_convolutions_run_in(pool, alone):
    net = spread_resnet20(pool)
    assert _eager(net, 4)._steps.inputs[0].is_contiguous()
    net = net.to(memory_format=torch.channels_last)
    runner = _eager(net, 4)
    buffer = runner._steps.inputs[0]
    assert not buffer.is_contiguous()
    assert buffer.is_contiguous(memory_format=torch.channels_last)
    _check(runner(pool[:7]), alone, slice(0, 7))


def test_one_replaced_tensor_is_refused_and_nothing_is_lost():
    net = _toy()
    runner = _eager(net, 4)
    x = torch.randn(3, 3, 16, 16)
    before = runner(x)
    weight = net.heads[0].classifier.weight
    weight.data = weight.data.clone()  # the same values, in other memory
    with pytest.raises(CudaGraphError, match=r"a tensor replaced.*Hint: capture again"):
        runner(x)
    again = _eager(net, 4)(x)
    torch.testing.assert_close(again.logits, before.logits, rtol=0, atol=0)


def test_calls_fold_again_only_after_a_change(pool, monkeypatch):
    """Each call checks the net's tensors at once; the folded pairs are asked only when one
    changed in place, or `net.train()` told them to fold again."""
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20", zero_init_last=False), n_exits=3).eval()
    runner = _eager(net, 8)
    asked = []
    source_key = FoldedConvBN.source_key
    monkeypatch.setattr(
        FoldedConvBN, "source_key", lambda self: asked.append(self) or source_key(self)
    )
    x = pool[:8]
    runner(x)
    asked.clear()
    runner._prepare()
    assert asked == []  # nothing changed: no pair is asked
    other = earlyexit.convert(timm.create_model("resnet20", zero_init_last=False), n_exits=3)
    net.load_state_dict(other.state_dict())  # in place: the version counters move
    runner._prepare()
    assert len(asked) >= len(runner._steps.folded)
    # An edit through `.data` moves no counter; a switch of mode folds again anyway.
    with torch.no_grad():
        runner._steps.folded[1].conv.weight.data.mul_(2.0)
    net.train().eval()
    asked.clear()
    runner._prepare()
    assert asked
    out = runner(x, threshold=2.0)
    with torch.no_grad():
        expected = net.forward_all(x).logits[-1]
    torch.testing.assert_close(out.logits, expected, **TOL)


def test_weights_loaded_after_capture_are_folded_again_for_the_replay(pool, monkeypatch):
    """A graph replays the folded weights it was captured with; a call folds them again."""
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20", zero_init_last=False), n_exits=3).eval()
    runner = _replaying(net, 8)
    with torch.no_grad():
        runner(pool[:8])

    # As a replay does: the captured folded tensors, no Python check of the weights.
    def replay(self, x):
        return self.conv._conv_forward(x, self._weight, self._bias)

    def replay_head(self, x):
        f = self._folded
        pair = f.folded_conv
        y = pair.conv._conv_forward(f.pool(x), pair._weight, pair._bias).relu_()
        layout = not y.is_contiguous()
        return f.tail(y, layout, f._matrices[layout], f._bias, f._certainty)

    monkeypatch.setattr(FoldedConvBN, "forward", replay)
    monkeypatch.setattr(InferenceHead, "forward", replay_head)
    assert all(isinstance(h, InferenceHead) for h in runner._steps.heads)
    other = earlyexit.convert(timm.create_model("resnet20", zero_init_last=False), n_exits=3)
    net.load_state_dict(other.state_dict())
    out = runner(pool[:8], threshold=2.0)
    first = runner(pool[:8], threshold=0.0)  # every sample leaves at exit 0: head 0's logits
    with torch.no_grad():
        expected = net.forward_all(pool[:8]).logits
    torch.testing.assert_close(out.logits, expected[-1], **TOL)
    assert first.exit_index.tolist() == [0] * 8
    torch.testing.assert_close(first.logits, expected[0], **TOL)
