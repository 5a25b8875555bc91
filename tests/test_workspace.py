"""Convolution temporaries written into a workspace made per call (`earlyexit.fx._workspace`).

The invariants: a stage with workspaces gives the values of the same stage without them, bit
for bit and in the same layout; a slot is written again only after every reader of its last
tensor has run; nothing the stage returns, and nothing it writes into otherwise, lives in a
slot; and calls, also concurrent ones, never share a workspace.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch
from torch import fx, nn
from torch.torch_version import TorchVersion

import earlyexit
import earlyexit.fx._inplace
import earlyexit.fx._pointwise
from earlyexit.fx._fold import fold_batchnorm
from earlyexit.fx._inplace import rewrite_chain, rewrite_inplace
from earlyexit.fx._pointwise import FusedConv, fuse_pointwise, fused_op_available
from earlyexit.fx._workspace import Workspace

from toy_models import randomize_norms

needs_onednn = pytest.mark.skipif(
    not fused_op_available(), reason="this PyTorch build has no oneDNN fused convolutions"
)


@pytest.fixture(autouse=True)
def fuse_small_outputs(monkeypatch):
    """The tests' small tensors run the fused op too (it runs for large outputs only)."""
    monkeypatch.setattr(earlyexit.fx._pointwise, "MIN_FUSED_ELEMENTS", 0)


def _conv_bn(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))


class Basic(nn.Module):
    """relu(bn(conv(x))) read by the second convolution only, then the sum and a ReLU."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.a, self.b = _conv_bn(width), _conv_bn(width)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))) + x)


class Bottleneck(nn.Module):
    """Two temporaries alive at once: the second convolution reads the first's output."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.a, self.b, self.c = _conv_bn(width), _conv_bn(width), _conv_bn(width)

    def forward(self, x):
        t = torch.relu(self.a(x))
        u = torch.relu(self.b(t))
        return torch.relu(self.c(u) + x)


def _stages(model: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The traced model with its norms folded, and that with the inference rewrites."""
    torch.manual_seed(0)
    randomize_norms(model)
    folded = fold_batchnorm(fx.symbolic_trace(model.eval()))
    return folded, rewrite_inplace(fuse_pointwise(folded))


def _slots(gm: fx.GraphModule) -> list[int | None]:
    """Each ReLU-only fused convolution's slot, in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if isinstance(module, FusedConv) and not module.add:
                found.append(module.slot)
    return found


@pytest.fixture
def buffers(monkeypatch):
    """The buffers `Workspace.take` hands out, in order, as (workspace, data_ptr)."""
    taken: list[tuple[Workspace, int]] = []
    take = Workspace.take

    def spy(self, slot, shape, channels_last):
        buffer = take(self, slot, shape, channels_last)
        taken.append((self, buffer.data_ptr()))  # kept alive: ids stay distinct
        return buffer

    monkeypatch.setattr(Workspace, "take", spy)
    return taken


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
def test_the_blocks_temporaries_reuse_one_buffer_with_the_same_values(channels_last, buffers):
    plain, fast = _stages(nn.Sequential(Basic(), Basic(), Basic()))
    assert _slots(fast) == [0, 0, 0]
    x = torch.randn(2, 8, 9, 9)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
        kept = got.clone()
        again = fast(x + 1)
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    assert torch.equal(x, before)
    # One buffer per call, taken by each block; the first call's result is not the buffer.
    first, second = buffers[:3], buffers[3:]
    assert len(first) == len(second) == 3
    assert len(set(first)) == 1 and len(set(second)) == 1
    assert first[0][0] is not second[0][0]  # a workspace per call
    assert torch.equal(got, kept) and not torch.equal(again, kept)


@needs_onednn
def test_temporaries_alive_together_get_slots_of_their_own():
    plain, fast = _stages(nn.Sequential(Bottleneck(), Bottleneck()))
    # The first temporary is the second convolution's input: the second gets slot 1. The
    # next block's first temporary reuses slot 0, whose readers have all run.
    assert _slots(fast) == [0, 1, 0, 1]
    x = torch.randn(2, 8, 7, 7)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))


def test_temporaries_read_otherwise_or_returned_get_no_slot():
    class Others(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d, self.e = (_conv_bn(4) for _ in range(5))

        def forward(self, x):
            t = torch.relu(self.a(x))  # read by a product too
            u = torch.relu(self.b(t)) * t
            v = torch.relu(self.c(u))  # the sum's other operand, which the sum may write
            w = torch.relu(self.d(u) + v)
            s = torch.relu(self.e(w))  # returned
            return w, s

    plain, fast = _stages(Others())
    assert _slots(fast) == [None, None, None, None]
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        for got, expected in zip(fast(x), plain(x), strict=True):
            assert torch.equal(got, expected)


@needs_onednn
@pytest.mark.parametrize("returned", [False, True])
def test_a_temporary_read_through_an_identity_gets_a_slot_unless_it_escapes(returned):
    class Through(nn.Module):  # timm's `aa` between a block's ReLU and its next convolution
        def __init__(self):
            super().__init__()
            self.a, self.b, self.aa = _conv_bn(8), _conv_bn(8), nn.Identity()

        def forward(self, x):
            t = self.aa(torch.relu(self.a(x)))
            y = torch.relu(self.b(t) + x)
            return (y, t) if returned else y

    plain, fast = _stages(Through())
    assert _slots(fast) == [None if returned else 0]
    x = torch.randn(2, 8, 7, 7)
    with torch.inference_mode():
        got, expected = fast(x), plain(x)
    if not returned:
        got, expected = (got,), (expected,)
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


@needs_onednn
def test_concurrent_calls_each_have_their_own_workspace():
    plain, fast = _stages(nn.Sequential(Basic(), Bottleneck(), Basic()))
    inputs = [torch.randn(3, 8, 16, 16) for _ in range(16)]
    with torch.inference_mode():
        expected = [plain(x) for x in inputs]

    def run(x):
        with torch.inference_mode():
            return fast(x)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(run, inputs))
    assert all(torch.equal(g, e) for g, e in zip(got, expected, strict=True))


@needs_onednn
def test_a_slot_buffer_that_does_not_fit_is_not_written():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).eval()
    fused = FusedConv(conv, add=False, relu=True).writing_into_workspace(0)
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = torch.relu(conv(x))
        workspace = Workspace()
        got = fused(x, workspace)
        assert torch.equal(got, expected)
        assert got.data_ptr() == workspace.take(0, (2, 4, 6, 6), True).data_ptr()
        # No workspace (a caller that passes none): a fresh output.
        assert torch.equal(fused(x, None), expected)
        # The convolution's own input in the slot: never overwritten.
        sneaky = Workspace()
        sneaky._buffers[0] = x
        kept = x.clone()
        assert torch.equal(fused(x, sneaky), expected) and torch.equal(x, kept)
        # With autograd on, the ops run as written, into fresh memory.
    with torch.enable_grad():
        assert torch.equal(fused(x, Workspace()), expected)
    with pytest.raises(ValueError, match="ReLU-only"):
        FusedConv(conv, add=True, relu=True, slot=0)


def test_take_makes_a_buffer_per_slot_shape_and_layout():
    workspace = Workspace()
    a = workspace.take(0, (2, 3, 4, 4), True)
    assert a.is_contiguous(memory_format=torch.channels_last) and a.shape == (2, 3, 4, 4)
    assert workspace.take(0, (2, 3, 4, 4), True) is a
    assert workspace.take(1, (2, 3, 4, 4), True) is not a
    b = workspace.take(0, (2, 3, 4, 4), False)
    assert b is not a and b.is_contiguous()
    assert workspace.take(0, (1, 3, 4, 4), False) is not b
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:  # the fused convolutions' dtype, whatever the default
        assert workspace.take(2, (1, 2, 2, 2), False).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)


_ZOO = ["resnet20", "test_resnet", "resnet18", "mobilenetv3_small_050", "test_efficientnet"]

# The oneDNN of PyTorch 2.14 runs the same kernel for a convolution written into a workspace as
# for one written into fresh memory; an older one (PyTorch 2.11's) may pick another for the
# in-place op, whose values then differ in their last bits.
_SAME_KERNEL = TorchVersion(torch.__version__) >= "2.14"


@needs_onednn
@pytest.mark.parametrize("name", _ZOO)
def test_converted_stages_with_workspaces_equal_those_without(name, monkeypatch):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=7).eval()
    randomize_norms(model, seed=1)
    net = earlyexit.convert(model, n_exits=3, dist="linear").eval()
    x = torch.randn(3, *net.input_size)
    chain = [fuse_pointwise(fold_batchnorm(s)) for s in net.stages(training=False)]
    with_slots = rewrite_chain(chain)
    monkeypatch.setattr(earlyexit.fx._inplace, "assign_workspaces", lambda gm: 0)
    without = rewrite_chain(chain)
    if name in ("resnet20", "test_resnet", "resnet18"):  # resnet18: through Identity calls
        assert any(slot is not None for s in with_slots for slot in _slots(s))
    with torch.inference_mode():
        h = g = x
        for a, b in zip(with_slots, without, strict=True):
            h, g = a(h), b(g)
            assert h.stride() == g.stride()
            if _SAME_KERNEL:
                assert torch.equal(h, g)
            else:
                torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-4)
