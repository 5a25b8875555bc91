"""The inference stages: ops rewritten to write into temporaries the stage owns, autograd off.

The invariant is that they give the eval stages' results bit for bit, with autograd on or off,
and never write into anything they do not own: their input, a parameter, a view, a tensor that
is read again later. Chained stages (`rewrite_chain`) own their input from the second stage
on, where the stage before returns a tensor it made, and nowhere else.
"""

from __future__ import annotations

import operator

import pytest
import timm
import torch
from torch import fx, nn

import earlyexit
from earlyexit.fx._inplace import add_, relu_, rewrite_chain, rewrite_inplace
from earlyexit.fx._pointwise import FusedConv, fused_convolutions, fused_op_available

from toy_models import randomize_norms


def _rewritten(gm: fx.GraphModule) -> list[str]:
    """The names of the in-place helpers a rewritten graph calls."""
    return [n.target.__name__ for n in gm.graph.nodes if n.op == "call_function" and
            n.target.__module__ == "earlyexit.fx._inplace"]  # fmt: skip


def _check(model: nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """Rewrite a traced model; assert it matches the original, with and without autograd,
    and leaves its inputs as they were. Returns the rewritten module."""
    model.eval()
    gm = fx.symbolic_trace(model)
    fast = rewrite_inplace(gm)
    saved = [t.clone() for t in inputs]
    with torch.no_grad():
        expected = model(*inputs)
    for mode in (torch.no_grad, torch.inference_mode, torch.enable_grad):
        with mode():
            got = fast(*inputs)
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
        for t, s in zip(inputs, saved):
            assert torch.equal(t, s), "an input was overwritten"
    return fast


class Residual(nn.Module):
    """`relu(bn(conv(x)) + x)`: both the sum and the relu can write into the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)) + x)


def test_a_residual_block_works_in_place_and_keeps_its_input():
    fast = _check(Residual(), torch.randn(2, 4, 5, 5))
    assert _rewritten(fast) == ["add_", "relu_"]


class ReadAgain(nn.Module):
    """The conv's output is read after the sum: the sum must not overwrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        z = y + x
        return z * y


class KeepsAView(nn.Module):
    """A view of the conv's output is returned beside a sum that could overwrite it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        head = y[:, :2]
        return torch.relu(y + 1.0), head


class OnlyInputsAndParams(nn.Module):
    """Nothing here is a temporary the module made: its input and a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(4, 1, 1))

    def forward(self, x):
        return torch.relu(x + self.bias)


@pytest.mark.parametrize("cls", [ReadAgain, KeepsAView, OnlyInputsAndParams])
def test_what_is_read_again_or_not_owned_is_never_written(cls):
    fast = _check(cls(), torch.randn(2, 4, 5, 5))
    if cls is OnlyInputsAndParams:
        # The sum is new, so the relu may write into it, but the sum may not write into x.
        assert _rewritten(fast) == ["relu_"]
    if cls is ReadAgain:
        # Only the product (its operands' last reader) may write into the sum.
        assert _rewritten(fast) == ["mul_"]


class Broadcasts(nn.Module):
    """The owned operand is the smaller one of a broadcast, or of a narrower dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x, wide):
        small = self.pool(x)  # (B, C, 1, 1), owned
        return small + x, self.pool(x) + wide  # out of place: shape; dtype


def test_broadcasts_and_type_promotion_fall_back_to_out_of_place():
    x = torch.randn(2, 4, 5, 5)
    fast = _check(Broadcasts(), x, torch.randn(2, 4, 1, 1, dtype=torch.float64))
    assert _rewritten(fast) == ["add_", "add_"]  # rewritten, and checked when run
    with torch.no_grad():
        a, b = fast(x, torch.randn(2, 4, 1, 1, dtype=torch.float64))
    assert a.shape == (2, 4, 5, 5) and b.dtype == torch.float64


class PassThrough(nn.Module):
    """Identity and eval-mode dropout return their input: ownership passes through them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.5)
        self.skip = nn.Identity()
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.skip(self.drop(self.act(self.fc(x))))
        return y + x


def test_ownership_passes_through_identity_dropout_and_inplace_activations():
    fast = _check(PassThrough(), torch.randn(3, 6))
    assert _rewritten(fast) == ["add_"]


def test_the_helpers_compute_out_of_place_with_autograd_on():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3)
    y = a * 2  # a temporary that autograd may need
    out = add_(y, b)
    assert out is not y and y.grad_fn is not None
    (relu_(out).sum()).backward()
    assert a.grad is not None
    with torch.no_grad():
        t = torch.randn(3)
        expected = torch.relu(t + b)
        ptr = t.data_ptr()
        assert relu_(add_(t, b)).data_ptr() == ptr and torch.equal(t, expected)


_ZOO = ["resnet20", "test_resnet", "mobilenetv3_small_050", "test_vit", "test_efficientnet"]


def _net(name: str) -> tuple[nn.Module, earlyexit.EarlyExitNet]:
    torch.manual_seed(0)
    kwargs = {"zero_init_last": False} if name == "resnet20" else {}
    model = timm.create_model(name, num_classes=7, **kwargs).eval()
    randomize_norms(model, seed=1)
    return model, earlyexit.convert(model, n_exits=3, dist="linear").eval()


@pytest.mark.parametrize("name", _ZOO)
def test_the_inplace_rewrite_equals_the_eval_stages_bit_for_bit(name):
    model, net = _net(name)
    x = torch.randn(3, *net.input_size)
    before = x.clone()
    plain = net.stages(training=False)
    fast = [rewrite_inplace(s) for s in plain]
    with torch.inference_mode():
        h = g = x
        for f, p in zip(fast, plain, strict=True):
            h, g = f(h), p(g)
            assert torch.equal(h, g)
        assert torch.equal(h, model(x))
    assert torch.equal(x, before)


@pytest.mark.parametrize("name", _ZOO)
def test_inference_stages_equal_the_eval_stages_up_to_rounding(name):
    # The inference stages also fold batch norms into convolutions (`earlyexit.fx._fold`).
    model, net = _net(name)
    x = torch.randn(3, *net.input_size)
    before = x.clone()
    fast, plain = net.staged.inference_stages(), net.stages(training=False)
    with torch.inference_mode():
        h = g = x
        for f, p in zip(fast, plain, strict=True):
            h, g = f(h), p(g)
            torch.testing.assert_close(h, g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))
        result = net.early_exit(x, threshold=2.0)
        torch.testing.assert_close(result.logits, model(x), rtol=1e-4, atol=1e-4)
    assert torch.equal(x, before)


@pytest.mark.parametrize("fuse", [True, False])
def test_resnet_stages_write_their_sums_and_relus_in_place(fuse):
    net = earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=2).eval()
    net.fold_batchnorm = fuse  # without folding nothing is fused (`earlyexit.fx._pointwise`)
    stages = net.staged.inference_stages()
    names = [name for stage in stages for name in _rewritten(stage)]
    fused = fused_convolutions(stages)
    # Nine blocks: two relus and one sum each, and nothing in the plain eval stages.
    relus = names.count("relu_") + sum(m.relu for m in fused)
    assert relus == 2 * 9 + 1 and names.count("add_") + sum(m.add for m in fused) == 9
    assert bool(fused) == fuse
    assert not any(_rewritten(s) for s in net.stages(training=False))


def test_inference_stages_follow_the_net_to_another_dtype():
    net = earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=2).eval()
    first = net.staged.inference_stages()
    net = net.double()
    again = net.staged.inference_stages()
    assert again[0] is not first[0]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.inference_mode():
        assert net.early_exit(x, threshold=2.0).logits.dtype == torch.float64


def test_operator_targets_are_rewritten_only_from_known_producers():
    g = fx.Graph()
    x = g.placeholder("x")
    s = g.call_function(operator.add, (x, x))
    t = g.call_function(operator.add, (s, 1.0))
    g.output(t)
    fast = rewrite_inplace(fx.GraphModule(nn.Module(), g))
    # The first sum reads only the input; the second writes into the first, its owner.
    assert _rewritten(fast) == ["add_"]
    x = torch.randn(3)
    with torch.inference_mode():
        assert torch.equal(fast(x), x + x + 1.0)


def _stage(fn) -> fx.GraphModule:
    """A one-input stage traced from a function."""
    return fx.symbolic_trace(fn)


def _reads_input_in_place(gm: fx.GraphModule) -> int:
    """How many ops of a rewritten stage write into its input."""
    count = 0
    for node in gm.graph.nodes:
        module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
        if isinstance(module, FusedConv) and module.into_other:
            count += node.args[1].op == "placeholder"
        elif node.op == "call_function" and node.target in (add_, relu_):
            count += node.args[0].op == "placeholder"
    return count


def test_chained_stages_own_their_input_only_after_a_stage_that_made_its_output():
    made = _stage(lambda x: x * 2.0)  # a new tensor
    passes = _stage(lambda x: x)  # its input: at the head of the chain, the caller's
    view = _stage(lambda x: x[:, :2])  # a view of its input
    relu = _stage(lambda x: torch.relu(x))
    # The first stage never owns its input, however it is chained.
    first = rewrite_chain([relu, relu])
    assert _reads_input_in_place(first[0]) == 0 and _reads_input_in_place(first[1]) == 1
    assert [_reads_input_in_place(s) for s in rewrite_chain([made, relu])] == [0, 1]
    assert [_reads_input_in_place(s) for s in rewrite_chain([passes, relu])] == [0, 0]
    assert [_reads_input_in_place(s) for s in rewrite_chain([made, view, relu])] == [0, 0, 0]
    # A stage that owns its input and returns it passes the ownership on.
    chain = rewrite_chain([made, relu, relu])
    assert [_reads_input_in_place(s) for s in chain] == [0, 1, 1]
    x = torch.randn(2, 4)
    before = x.clone()
    with torch.inference_mode():
        h = x
        for stage in chain:
            h = stage(h)
    assert torch.equal(h, torch.relu(before * 2.0)) and torch.equal(x, before)


@pytest.mark.parametrize("name", _ZOO)
def test_chained_inference_stages_equal_the_others_bit_for_bit(name):
    _, net = _net(name)
    x = torch.randn(3, *net.input_size)
    before = x.clone()
    alone, chained = net.staged.inference_stages(), net.staged.inference_stages(chained=True)
    assert _reads_input_in_place(chained[0]) == 0
    with torch.inference_mode():
        h = g = x
        for a, c in zip(alone, chained, strict=True):
            g, h = a(g), c(h.clone())  # a copy: the chained stage may write into its input
            assert torch.equal(h, g)
        result = net.early_exit(x, threshold=2.0)
    assert torch.equal(x, before)
    assert torch.equal(result.logits, g)


def test_chained_resnet_stages_write_their_first_sum_into_their_input(monkeypatch):
    monkeypatch.setattr(earlyexit.fx._pointwise, "MIN_FUSED_ELEMENTS", 0)  # small tensors too
    net = earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=2).eval()
    alone, chained = net.staged.inference_stages(), net.staged.inference_stages(chained=True)
    assert [_reads_input_in_place(s) for s in alone] == [0, 0, 0]
    # Stage 1 begins with a block whose shortcut is its input, and sums into it with the
    # convolution (the other sums write into the convolutions' own outputs); stage 2 begins
    # with a downsampling block, whose shortcut is a padded copy of its input.
    assert [_reads_input_in_place(s) for s in chained] == [0, 1, 0]
    x = torch.randn(4, *net.input_size)
    with torch.inference_mode():
        h = chained[0](x)
        kept = h.clone()
        out = chained[1](h)
        assert torch.equal(out, alone[1](kept))
    if fused_op_available():
        assert out.data_ptr() == h.data_ptr()  # written into the input, which it owns
    net.fold_batchnorm = False  # then the sum writes into the convolution's output
    chained = net.staged.inference_stages(chained=True)
    assert [_reads_input_in_place(s) for s in chained] == [0, 0, 0]
