"""The GPU path: the same invariants as on CPU, one host synchronisation per exit, channels_last,
autocast, `net.compile()`, save/load and export on a CUDA device, and CUDA graphs.

Every test here is marked `gpu` and skipped where there is no CUDA device (see conftest.py);
run them with `pytest -m gpu` on a machine that has one.
"""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
import timm
import torch
from torch import nn

import earlyexit
from earlyexit.cuda_graphs import CudaGraphError
from earlyexit.export import export_stages
from earlyexit.inference import exit_mask

from toy_models import ToyNet, decisive_confidences

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _exact_cuda_math():
    """TF32 would make the batched and the per-sample results differ by more than float noise."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _net(name: str = "resnet20", n_exits: int = 3, batch: int = 64):
    torch.manual_seed(0)
    if name == "toy":
        net = earlyexit.convert(ToyNet(), n_exits=n_exits, input_size=(3, 16, 16))
    else:
        net = earlyexit.convert(timm.create_model(name), n_exits=n_exits)
    net = net.eval().cuda()
    x = torch.randn(batch, *net.input_size, device="cuda")
    decisive_confidences(net, x)
    return net, x


def _first_confident(confidence_logits: list[torch.Tensor], threshold: float) -> torch.Tensor:
    leave = torch.stack(
        [exit_mask(a, threshold) for a in confidence_logits]
        + [torch.ones_like(confidence_logits[0], dtype=torch.bool)]
    )
    return leave.int().argmax(0)


@torch.no_grad()
def test_cuda_each_sample_gets_its_exit_whatever_the_batch():
    net, x = _net()
    full = net.forward_all(x)
    batched = net.early_exit(x)
    expected = _first_confident(full.confidence_logits, net.threshold)
    h = torch.stack([torch.sigmoid(a) for a in full.confidence_logits])
    clear = ((h - net.threshold).abs() > 1e-3).all(0)
    assert clear.sum() >= 48
    assert (torch.bincount(expected, minlength=net.num_exits + 1) > 0).sum() >= 3
    assert batched.exit_index.device.type == "cuda" and batched.cost.device.type == "cuda"
    assert torch.equal(batched.exit_index[clear], expected[clear])
    for i in torch.nonzero(clear).flatten().tolist()[:16]:
        k = int(expected[i])
        alone = net.early_exit(x[i : i + 1])
        assert int(alone.exit_index) == k
        torch.testing.assert_close(batched.logits[i], full.logits[k][i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(alone.logits[0], batched.logits[i], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_cuda_one_host_synchronisation_per_exit():
    net, x = _net(n_exits=3)
    net.early_exit(x)  # warm up: cuDNN's first calls may synchronise on their own
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = net.early_exit(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    # The run reached every early exit (so each exit's count was read once) ...
    assert int(out.exit_index.max()) == net.num_exits
    # ... and nothing else waited for the device.
    assert 1 <= len(syncs) <= net.num_exits, [str(w.message) for w in syncs]


@torch.no_grad()
def test_cuda_channels_last_and_autocast():
    net, x = _net()
    ref = net.early_exit(x)
    cl_net = net.to(memory_format=torch.channels_last)
    cl = cl_net.early_exit(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(cl.exit_index, ref.exit_index)
    torch.testing.assert_close(cl.logits, ref.logits, rtol=1e-3, atol=1e-3)
    for dtype in (torch.float16, torch.bfloat16):
        with torch.autocast("cuda", dtype=dtype):
            amp = net.early_exit(x)
            full = net.forward_all(x)
        assert amp.logits.dtype == dtype
        # Under autocast too, each sample leaves at the first exit whose (half-precision)
        # confidence reaches T.
        expected = _first_confident(full.confidence_logits, net.threshold)
        h = torch.stack([torch.sigmoid(a.float()) for a in full.confidence_logits])
        # A margin of 0.1 in h: bfloat16 keeps about 3 significant digits of each term of
        # the confidence logit, and the folded heads of `early_exit` round differently from
        # the heads as written that `forward_all` runs.
        clear = ((h - net.threshold).abs() > 0.1).all(0)
        assert clear.sum() >= 16
        assert torch.equal(amp.exit_index[clear], expected[clear])


@torch.no_grad()
def test_cuda_save_load_and_export(tmp_path):
    net, x = _net(n_exits=2)
    path = tmp_path / "net.safetensors"
    earlyexit.save(net, path)
    loaded = earlyexit.load(path, map_location="cuda")
    assert next(loaded.parameters()).device.type == "cuda"
    a, b = net.early_exit(x), loaded.early_exit(x)
    assert torch.equal(a.exit_index, b.exit_index)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    runner = export_stages(net, x[:2])
    c = runner(x)
    assert c.logits.device.type == "cuda"
    assert torch.equal(c.exit_index, a.exit_index)
    torch.testing.assert_close(c.logits, a.logits, rtol=1e-4, atol=1e-4)
    one = runner(x[:1])  # a batch axis that reaches down to a single sample
    assert torch.equal(one.exit_index, a.exit_index[:1])


# CUDA graphs. The padding around the steps is checked on CPU (test_cuda_graphs.py); here, that
# the captured graphs replay the same steps.


def _clear(net, x: torch.Tensor, threshold: float, margin: float = 1e-3) -> torch.Tensor:
    """The samples whose every confidence is further than `margin` from T: float noise of
    another batch size (a padded one) cannot move them to another exit."""
    full = net.forward_all(x)
    h = torch.stack([torch.sigmoid(a.float()) for a in full.confidence_logits])
    return ((h - threshold).abs() > margin).all(0)


def _assert_same(out, ref, clear: torch.Tensor, tol: float = 1e-4) -> None:
    assert torch.equal(out.exit_index[clear], ref.exit_index[clear])
    same = out.exit_index == ref.exit_index
    torch.testing.assert_close(out.logits[same], ref.logits[same], rtol=tol, atol=tol)
    torch.testing.assert_close(out.cost[same], ref.cost[same], rtol=0, atol=0)


def _count_calls(monkeypatch, cls, name: str) -> list[int]:
    calls: list[int] = []
    original = getattr(cls, name)

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, spy)
    return calls


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@torch.no_grad()
def test_cuda_graphs_give_the_eager_results(channels_last):
    net, x = _net(batch=80)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    graphed = earlyexit.capture_cuda_graphs(net, 32)
    assert graphed.batch_sizes == (1, 2, 4, 8, 16, 32)
    clear = _clear(net, x, net.threshold)
    assert clear.sum() >= 60
    # 80 runs in slices of 32, 32 and 16; the others are padded, and so is every later stage.
    batches = [x, x[:37], x[:5], x[:1], x[:0]]
    refs = [net.early_exit(b) for b in batches]
    assert (torch.bincount(refs[0].exit_index, minlength=net.num_exits + 1) > 0).sum() >= 3
    called = []
    hooks = [
        s.register_forward_pre_hook(lambda m, a: called.append(m))
        for s in net.staged.inference_stages()
    ]
    try:
        outs = [graphed(b) for b in batches]
    finally:
        for h in hooks:
            h.remove()
    assert called == []  # replayed graphs: no stage ran from Python
    for batch, out, ref in zip(batches, outs, refs, strict=True):
        assert out.logits.device.type == "cuda" and out.logits.shape == ref.logits.shape
        # channels_last kernels round differently at other batch sizes (as above, 1e-3).
        _assert_same(out, ref, clear[: len(batch)], tol=1e-3 if channels_last else 1e-4)
    # The first buffer is in the convolutions' layout: no conversion inside the first graph.
    first = graphed._steps.inputs[0]
    assert first.is_contiguous(memory_format=torch.channels_last) == channels_last


@torch.no_grad()
def test_cuda_graphs_wait_once_per_exit_and_never_sync_otherwise(monkeypatch):
    net, x = _net(n_exits=3)
    graphed = earlyexit.capture_cuda_graphs(net, 64)
    graphed(x)
    steps = graphed._steps
    reads = _count_calls(monkeypatch, type(steps), "read")
    replays = _count_calls(monkeypatch, torch.cuda.CUDAGraph, "replay")
    torch.cuda.synchronize()
    # Any stream or device synchronisation, any blocking copy, raises; the wait on the event
    # after the count's copy to pinned memory does not, and the spy on `read` counts it.
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = graphed(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    # Every exit was reached, and the host waited once at each, for the count of stayers ...
    assert int(out.exit_index.max()) == net.num_exits
    assert len(reads) == net.num_exits
    # ... while the stages ran as one graph each.
    assert len(replays) == net.num_exits + 1


@torch.no_grad()
def test_cuda_graphs_threshold_changes_without_recapture(monkeypatch):
    net, x = _net()
    graphed = earlyexit.capture_cuda_graphs(net, 64)
    captures = _count_calls(monkeypatch, torch.cuda.CUDAGraph, "capture_begin")
    saved = net.threshold
    try:
        for t in (0.0, 0.3, 0.7, 2.0):
            ref = net.early_exit(x, threshold=t)
            clear = _clear(net, x, t)
            _assert_same(graphed(x, threshold=t), ref, clear)
            net.threshold = t
            _assert_same(graphed(x), ref, clear)
    finally:
        net.threshold = saved
    assert captures == []


def test_cuda_predict_with_graphs_keeps_the_order(monkeypatch):
    net, x = _net(batch=40)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(2))
    batches = list(x[order.cuda()].cpu().split([5, 11, 1, 9, 14]))
    with torch.no_grad():
        results = [net.early_exit(x[k : k + 1]) for k in range(40)]
        clear = _clear(net, x, net.threshold)[order.cuda()].cpu()
    alone = earlyexit.EarlyExitResult(*(torch.cat(parts).cpu()[order] for parts in zip(*results)))
    eager = earlyexit.predict(net, batches, batch_size=8, progress=False)
    replays = _count_calls(monkeypatch, torch.cuda.CUDAGraph, "replay")
    graphed = earlyexit.predict(net, batches, batch_size=8, progress=False, cuda_graphs=True)
    assert replays  # the stages ran as graphs
    assert all(t.device.type == "cpu" for t in graphed.result)
    _assert_same(graphed.result, alone, clear)
    _assert_same(graphed.result, eager.result, clear)


def test_cuda_predict_with_graphs_waits_only_for_the_counts(monkeypatch):
    # Inputs already on the GPU: the host waits once per step, for the number of samples that
    # stay, and once at the end for the results' copies; no other synchronisation.
    net, x = _net(batch=72)
    graphed = earlyexit.capture_cuda_graphs(net, 16)
    batches = list(x.split(12))
    eager = earlyexit.predict(net, batches, batch_size=16, progress=False)
    reads = _count_calls(monkeypatch, type(graphed._steps), "read")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = earlyexit.predict(net, batches, batch_size=16, progress=False, cuda_graphs=graphed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert reads  # one per exit step run
    with torch.no_grad():
        clear = _clear(net, x, net.threshold).cpu()
    _assert_same(out.result, eager.result, clear)


def test_cuda_predict_with_graphs_from_a_pinning_data_loader():
    # predict captures while the loader's pin-memory thread allocates pinned memory: the
    # capture is thread-local, so that thread's CUDA calls do not invalidate it.
    net, x = _net(batch=96)
    data = torch.utils.data.TensorDataset(x.cpu(), torch.zeros(96, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=12, num_workers=2, pin_memory=True)
    eager = earlyexit.predict(net, loader, batch_size=16, progress=False)
    graphed = earlyexit.predict(net, loader, batch_size=16, progress=False, cuda_graphs=True)
    with torch.no_grad():
        clear = _clear(net, x, net.threshold).cpu()
    _assert_same(graphed.result, eager.result, clear)


@torch.no_grad()
def test_cuda_graphs_under_autocast():
    net, x = _net()
    with torch.autocast("cuda", dtype=torch.float16), pytest.raises(ValueError, match="cache"):
        earlyexit.capture_cuda_graphs(net, 64)
    with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
        graphed = earlyexit.capture_cuda_graphs(net, 64)
        ref = net.early_exit(x[:50])
        clear = _clear(net, x[:50], net.threshold, margin=0.1)  # bfloat16: as above
    out = graphed(x[:50])  # the graphs replay what they captured: bfloat16
    assert out.logits.dtype == torch.bfloat16
    assert clear.sum() >= 12
    assert torch.equal(out.exit_index[clear], ref.exit_index[clear])


class _Syncing(nn.Module):
    """A stage that reads a value back to the host: it runs, but cannot be captured."""

    def __init__(self, stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage(x)
        return y if float(y.abs().sum()) >= 0 else -y


@torch.no_grad()
def test_cuda_graphs_name_the_stage_that_cannot_be_captured(monkeypatch):
    net, x = _net("toy", n_exits=2)
    stages = net.staged.inference_stages()
    stages[1] = _Syncing(stages[1])
    monkeypatch.setattr(net.staged, "inference_stages", lambda chained=False: stages)
    with pytest.raises(CudaGraphError, match=r"Stage 1 with exit head 1 \(at `.+`\).*Hint"):
        earlyexit.capture_cuda_graphs(net, 8)
    # The caller's stream is back, and the device still works.
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    assert net.early_exit(x).exit_index.shape == (x.shape[0],)


# Last in the file, which the GPU check runs after the other files: a cold compile takes the
# longest, and the check runs the tests under a time limit.
@pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("clang") or shutil.which("gcc")),
    reason="torch.compile's CUDA kernels (Triton) build their launchers with $CC, clang or gcc",
)
@torch.no_grad()
def test_cuda_compiled_stages_match_eager():
    net, x = _net("toy", n_exits=2)
    batches = (x, x[:5], x[:1])  # compacted batches change size: no recompile errors
    eager = [net.early_exit(b) for b in batches]
    net.compile()
    for batch, ref in zip(batches, eager, strict=True):
        out = net.early_exit(batch)
        assert torch.equal(out.exit_index, ref.exit_index)
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-4)
