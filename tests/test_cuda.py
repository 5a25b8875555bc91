"""The GPU path: the same invariants as on CPU, one host synchronisation per exit, channels_last,
autocast, `net.compile()`, save/load and export on a CUDA device.

Every test here is marked `gpu` and skipped where there is no CUDA device (see conftest.py);
run them with `pytest -m gpu` on a machine that has one.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import earlyexit
from earlyexit.export import export_stages
from earlyexit.inference import exit_mask

from toy_models import ToyNet, spread_confidences

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
    spread_confidences(net, x)
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
        clear = ((h - net.threshold).abs() > 2e-2).all(0)
        assert clear.sum() >= 32
        assert torch.equal(amp.exit_index[clear], expected[clear])


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
