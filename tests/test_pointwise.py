"""Convolutions that apply the ReLU and the residual sum after them (oneDNN post-ops, on CPU).

The invariant is that a fused stage gives the unfused stage's values bit for bit and in the
same memory layout, with autograd on or off, with oneDNN on or off, and that what the fused
op cannot run (autograd, hooks, another dtype, a shortcut that broadcasts) runs as written.
"""

from __future__ import annotations

import operator

import pytest
import timm
import torch
import torchvision
from torch import fx, nn

import earlyexit
import earlyexit.fx._pointwise
from earlyexit.fx._fold import fold_batchnorm
from earlyexit.fx._inplace import rewrite_inplace
from earlyexit.fx._pointwise import (
    FusedConv,
    fuse_pointwise,
    fused_convolutions,
    fused_op_available,
)

from toy_models import randomize_norms

needs_onednn = pytest.mark.skipif(
    not fused_op_available(), reason="this PyTorch build has no oneDNN fused convolutions"
)


@pytest.fixture(autouse=True)
def fuse_small_outputs(monkeypatch):
    """The tests' small tensors run the fused op too (it runs for large outputs only)."""
    monkeypatch.setattr(earlyexit.fx._pointwise, "MIN_FUSED_ELEMENTS", 0)


def _fused(gm: fx.GraphModule) -> list[FusedConv]:
    return fused_convolutions([gm])


class Block(nn.Module):
    """A residual block: conv → bn → relu → conv → bn, the sum with the shortcut, a ReLU."""

    def __init__(self, width: int = 8, stride: int = 1, bias: bool = False, norm: bool = True):
        super().__init__()
        self.norm = norm
        self.conv1 = nn.Conv2d(width, width, 3, stride, 1, bias=bias)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=bias)
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU()
        self.down = nn.Conv2d(width, width, 1, stride) if stride > 1 else nn.Identity()
        randomize_norms(self)

    def forward(self, x):
        if not self.norm:  # plain convolutions, nothing to fold
            return self.act2(self.conv2(self.act1(self.conv1(x))) + self.down(x))
        y = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(y)) + self.down(x))


def _stage(model: nn.Module, fold: bool = True) -> tuple[fx.GraphModule, fx.GraphModule]:
    gm = fx.symbolic_trace(model.eval())
    plain = fold_batchnorm(gm) if fold else gm
    return plain, fuse_pointwise(plain)


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    ("stride", "bias", "fold"), [(1, False, True), (2, True, True), (1, True, False)]
)
def test_a_fused_block_gives_the_unfused_values_bit_for_bit(channels_last, stride, bias, fold):
    torch.manual_seed(0)
    plain, fast = _stage(Block(stride=stride, bias=bias, norm=fold), fold)
    # conv1 + relu, and conv2 + sum + relu; a strided block's shortcut conv is the sum's other.
    assert [(m.add, m.relu) for m in _fused(fast)] == [(False, True), (True, True)]
    x = torch.randn(3, 8, 11, 13)
    if channels_last:
        fast, plain = fast.to(memory_format=torch.channels_last), plain
        x = x.contiguous(memory_format=torch.channels_last)
    before = x.clone()
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
    assert torch.equal(got, expected)
    assert got.stride() == expected.stride()
    assert torch.equal(x, before)


@needs_onednn
@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_the_fused_op_runs_and_a_sum_alone_is_fused_too():
    class SumOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            return x + self.conv(x)

    plain, fast = _stage(SumOnly())
    (fused,) = _fused(fast)
    assert (fused.add, fused.relu) == (True, False)
    x = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = fast(x)
        with torch.backends.mkldnn.flags(enabled=False):
            assert not fused_op_available()
            off = fast(x)  # the separate ops
        expected = plain(x)
    assert any("_convolution_pointwise" in e.key for e in prof.key_averages())
    assert torch.equal(got, expected)
    # Without oneDNN, PyTorch's own convolution sums in another order.
    torch.testing.assert_close(off, expected, rtol=1e-5, atol=1e-5)


def test_with_autograd_on_the_ops_run_as_written_and_gradients_flow():
    torch.manual_seed(0)
    plain, fast = _stage(Block())
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    fast(x).sum().backward()
    grad = x.grad.clone()
    x.grad = None
    plain(x).sum().backward()
    assert torch.equal(grad, x.grad)


def test_other_dtypes_and_broadcast_shortcuts_run_unfused_with_the_same_values():
    class Broadcast(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bias = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return torch.relu(self.conv(x) + self.bias)

    plain, fast = _stage(Broadcast())
    assert len(_fused(fast)) == 1
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))
    plain, fast = _stage(Block().double())
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))


def test_hooks_on_the_fused_modules_still_run():
    model = Block()
    plain, fast = _stage(model)
    seen = []
    model.act2.register_forward_hook(lambda m, args, out: seen.append(out.shape) or out * 2)
    model.conv1.register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    x = torch.randn(2, 8, 5, 5)
    with torch.inference_mode():
        got = fast(x)
        assert len(seen) == 1
        expected = plain(x)
    assert torch.equal(got, expected)


class IdentitiesBetween(nn.Module):
    """timm's ResNet blocks: `drop_block` and `aa` are `nn.Identity` around the ReLU."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.drop_block, self.act1, self.aa = nn.Identity(), nn.ReLU(inplace=True), nn.Identity()
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        randomize_norms(self)

    def forward(self, x):
        y = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        return torch.relu(self.bn2(self.conv2(y)) + x)


@needs_onednn
def test_identities_between_a_convolution_and_its_relu_are_looked_through():
    model = IdentitiesBetween()
    plain, fast = _stage(model)
    first, second = _fused(fast)
    assert (first.add, first.relu, list(first.between)) == (False, True, [model.drop_block])
    assert second.add and not second.between
    x = torch.randn(2, 8, 7, 7)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))
    # A hook on the Identity: the ops run as written, the hook with them.
    seen = []
    model.drop_block.register_forward_hook(lambda m, args, out: seen.append(1) or out * 2)
    with torch.inference_mode():
        got, expected = fast(x), plain(x)
    assert torch.equal(got, expected) and len(seen) == 2


def test_what_the_fused_op_cannot_express_is_left_alone():
    class Patterns(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding="same")
            self.d = nn.Conv1d(4, 4, 3, padding=1)

        def forward(self, x):
            a = self.a(x)
            twice = torch.relu(a) + a  # the conv's output is read twice
            shortcut = (x * 2).add_(self.b(x))  # writes into the shortcut, not the conv's output
            same = torch.relu(self.c(x))  # padding given as a string
            flat = torch.relu(self.d(x.flatten(2)))  # 1-d
            return twice + shortcut + same + flat.reshape_as(x)

    plain, fast = _stage(Patterns())
    assert not _fused(fast)
    x = torch.randn(2, 4, 4, 4)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))


def test_a_sum_read_twice_is_fused_without_the_relu_after_it():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            s = operator.add(self.conv(x), x)
            return torch.relu(s) * s

    plain, fast = _stage(Branch())
    assert [(m.add, m.relu) for m in _fused(fast)] == [(True, False)]
    x = torch.randn(2, 4, 4, 4)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("resnet20", num_classes=10),
        lambda: torchvision.models.resnet50(num_classes=10),
        lambda: timm.create_model("mobilenetv3_small_050", num_classes=10),
    ],
    ids=["resnet20", "torchvision-resnet50", "mobilenetv3"],
)
@pytest.mark.filterwarnings("ignore:TF32 acceleration")
def test_inference_stages_of_converted_nets_fuse_and_keep_the_eval_values(make):
    torch.manual_seed(0)
    model = make()
    randomize_norms(model)
    size = (3, 32, 32) if isinstance(model, earlyexit.models.CifarResNet) else (3, 64, 64)
    net = earlyexit.convert(model, n_exits=2, input_size=size).eval()
    fused = fused_convolutions(net.staged.inference_stages())
    assert fused  # every family here has conv → bn → relu somewhere
    x = torch.randn(2, *size)
    with torch.inference_mode():
        h = g = x
        for fast, plain in zip(net.staged.inference_stages(), net.stages(False), strict=True):
            h, g = fast(h), plain(g)
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
        with torch.backends.mkldnn.flags(enabled=False):
            off = net.early_exit(x, threshold=2.0).logits
        on = net.early_exit(x, threshold=2.0).logits
    # Without oneDNN every FusedConv runs its ops one by one (PyTorch's own convolution).
    torch.testing.assert_close(on, off, rtol=1e-4, atol=1e-4 * float(off.abs().max()))


def test_the_resnet_blocks_fuse_both_convolutions():
    net = earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=2).eval()
    fused = fused_convolutions(net.staged.inference_stages())
    # The stem's conv + relu, then per block conv1 + relu and conv2 + sum + relu.
    assert sum(not m.add for m in fused) == 1 + 9
    assert sum(m.add and m.relu for m in fused) == 9


def test_a_fused_conv_needs_an_op_after_it():
    with pytest.raises(ValueError, match="sum, a ReLU"):
        FusedConv(nn.Conv2d(2, 2, 1), add=False, relu=False)


def _inference(model: nn.Module) -> tuple[fx.GraphModule, fx.GraphModule]:
    """The traced model with its norms folded, and that with the other inference rewrites."""
    folded = fold_batchnorm(fx.symbolic_trace(model.eval()))
    return folded, rewrite_inplace(fuse_pointwise(folded))


@needs_onednn
@pytest.mark.parametrize("channels_last", [False, True])
def test_a_block_writes_its_sum_into_the_shortcut_the_stage_owns(channels_last):
    torch.manual_seed(0)
    plain, fast = _inference(nn.Sequential(Block(), Block(), Block()))
    # The first block's shortcut is the stage's input: never written. The later ones are
    # the blocks before them, read by nothing else.
    assert [(m.add, m.into_other) for m in _fused(fast)] == [
        (False, False), (True, False), (False, False), (True, True), (False, False), (True, True)
    ]  # fmt: skip
    x = torch.randn(2, 8, 9, 9)
    if channels_last:
        fast, x = (
            fast.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    before = x.clone()
    with torch.inference_mode():
        expected, got = plain(x), fast(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fast(x)
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    assert torch.equal(x, before)
    assert any("_convolution_pointwise_" in e.key for e in prof.key_averages())


def test_a_shortcut_read_again_or_fed_to_the_convolution_is_not_written():
    class ReadAgain(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            s = self.a(x) * 2  # the stage's own tensor
            t = torch.relu(self.b(s) + s)  # s is read again below
            u = torch.relu(self.c(t) + t)  # t is the convolution's input too
            return u + s

    plain, fast = _inference(ReadAgain())
    assert [(m.add, m.into_other) for m in _fused(fast)] == [(True, False), (True, False)]
    x = torch.randn(2, 4, 5, 5)
    with torch.inference_mode():
        assert torch.equal(fast(x), plain(x))


@needs_onednn
def test_writing_into_the_shortcut_is_checked_when_it_runs():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1).eval()
    fused = FusedConv(conv, add=True, relu=True).writing_into_other()
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        expected = torch.relu(conv(x) + x)
        for other in (
            torch.randn(2, 4, 6, 6),  # NCHW, where the output would be channels_last
            x,  # the convolution's own input
            torch.randn(2, 4, 6, 12)[..., ::2],  # not dense
        ):
            kept = other.clone()
            expected = torch.relu(conv(x) + other)
            got = fused(x, other)
            assert torch.equal(got, expected) and torch.equal(other, kept)
            assert got.data_ptr() != other.data_ptr()
        other = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
        expected = torch.relu(conv(x) + other)
        got = fused(x, other)
    assert torch.equal(got, expected) and got.data_ptr() == other.data_ptr()
    with pytest.raises(ValueError, match="into its second input"):
        FusedConv(conv, add=False, relu=True, into_other=True)


@needs_onednn
def test_small_outputs_run_the_ops_one_by_one(monkeypatch):
    monkeypatch.setattr(earlyexit.fx._pointwise, "MIN_FUSED_ELEMENTS", 2 * 8 * 6 * 6 + 1)
    plain, fast = _stage(Block())
    x = torch.randn(2, 8, 6, 6)
    with torch.inference_mode():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got = fast(x)
        expected = plain(x)
    assert not any("_convolution_pointwise" in e.key for e in prof.key_averages())
    assert torch.equal(got, expected)


def test_an_in_place_op_between_the_convolution_and_the_sum_stops_the_fusion():
    class Between(nn.Module):
        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 3, padding=1)
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            h = self.c0(x)
            y = self.c(h)
            return y + self.act(h)  # writes into h, which `c` read before

    plain, fast = _inference(Between())
    assert not _fused(fast)
    x = torch.randn(2, 4, 6, 6)
    for mode in (torch.inference_mode, torch.enable_grad):
        with mode():
            assert torch.equal(fast(x), plain(x))


def test_sums_of_one_convolution_with_itself_and_in_place_sums_are_left_alone():
    class Sums(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.c = nn.Conv2d(4, 4, 1, groups=2)

        def forward(self, x, shortcut):
            y = self.a(x)
            # `add_` keeps the convolution's dtype, `+` would promote it; grouped: not fused.
            return (y + y) + self.b(x).add_(shortcut) + torch.relu(self.c(x))

    gm = fx.symbolic_trace(Sums().eval())
    fast = fuse_pointwise(gm)
    assert not _fused(fast)
    x = torch.randn(2, 4, 5, 5)
    shortcut = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.equal(fast(x, shortcut), gm(x, shortcut))


@needs_onednn
def test_a_shortcut_whose_strides_fit_both_layouts_is_not_written():
    conv = nn.Conv2d(4, 4, 1).eval()  # a 1×1 weight is dense in both layouts
    fused = FusedConv(conv, add=True, relu=True).writing_into_other()
    x = torch.randn(2, 4, 6, 6)
    other = torch.randn(2, 4, 6, 6)
    with torch.inference_mode():
        expected = torch.relu(conv(x) + other)
        got = fused(x, other)
    assert torch.equal(got, expected) and got.stride() == expected.stride()
