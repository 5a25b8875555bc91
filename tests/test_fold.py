"""Batch norms folded into the convolutions before them, in the stages inference runs."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import fx, nn
from torch.nn.utils import prune

import earlyexit
from earlyexit.fx._fold import FoldedConvBN, fold_batchnorm, folded_pairs

from toy_models import randomize_norms


class ConvBN(nn.Module):
    def __init__(self, dims: int = 2, bias: bool = False, affine: bool = True) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
        self.conv = conv(3, 8, 3, padding=1, bias=bias)
        self.bn = norm(8, affine=affine)
        self.act = nn.ReLU()
        randomize_norms(self.bn)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class ReadTwice(nn.Module):
    """The convolution's output is read by the norm and again by the sum: not foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        randomize_norms(self.bn)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


def _folded(gm: nn.Module) -> list[FoldedConvBN]:
    return folded_pairs([gm])


def _fold(module: nn.Module) -> fx.GraphModule:
    return fold_batchnorm(fx.symbolic_trace(module.eval()))


@pytest.mark.parametrize(
    ("dims", "bias", "affine"),
    [(1, False, True), (2, False, True), (2, True, False), (3, True, True)],
)
def test_a_folded_pair_gives_the_pair_s_result(dims, bias, affine):
    torch.manual_seed(0)
    module = ConvBN(dims, bias, affine).eval()
    folded = _fold(module)
    assert len(_folded(folded)) == 1
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in _called(folded))
    x = torch.randn(4, 3, *[6] * dims)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), module(x), rtol=1e-5, atol=1e-5)


def _called(gm: fx.GraphModule) -> list[nn.Module]:
    return [gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module"]


def test_with_autograd_on_the_pair_runs_unfolded_and_gradients_reach_both():
    torch.manual_seed(0)
    module = ConvBN().eval()
    folded = _fold(module)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(folded(x), module(x))  # the same ops, so bit for bit
    folded(x).sum().backward()
    assert module.conv.weight.grad is not None and module.bn.weight.grad is not None


def test_a_norm_in_train_mode_runs_unfolded():
    torch.manual_seed(0)
    module = ConvBN().eval()
    folded = _fold(module)
    module.bn.train()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        expected = nn.functional.relu(module.bn(module.conv(x)))  # updates the statistics
        module.bn.running_mean.zero_(), module.bn.running_var.fill_(1.0)
        assert torch.equal(folded(x), expected)


def test_what_is_not_a_plain_pair_is_left_alone():
    assert not _folded(_fold(ReadTwice()))
    act = timm.layers.BatchNormAct2d(8)  # a subclass whose forward also applies an activation
    seq = nn.Sequential(nn.Conv2d(3, 8, 3), act).eval()
    assert not _folded(fold_batchnorm(fx.symbolic_trace(seq)))
    mismatched = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm3d(8)).eval()
    assert not _folded(fold_batchnorm(fx.symbolic_trace(mismatched)))


def test_changed_weights_are_folded_again_into_the_same_tensors():
    torch.manual_seed(0)
    module = ConvBN().eval()
    folded = _fold(module)
    pair = _folded(folded)[0]
    x = torch.randn(2, 3, 5, 5)
    with torch.inference_mode():  # the folded tensors are made here first
        folded(x)
    weight, bias = pair.folded()
    pointers = weight.data_ptr(), bias.data_ptr()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module.train()
    module(torch.randn(8, 3, 5, 5)).square().mean().backward()
    optimizer.step()  # changes the weights and, in train mode, the running statistics
    module.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), module(x), rtol=1e-5, atol=1e-5)
    assert (pair.folded()[0].data_ptr(), pair.folded()[1].data_ptr()) == pointers
    state = ConvBN().state_dict()
    module.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), module(x), rtol=1e-5, atol=1e-5)


def test_a_channels_last_weight_stays_channels_last():
    module = ConvBN().eval().to(memory_format=torch.channels_last)
    folded = _fold(module)
    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = folded(x)
        torch.testing.assert_close(out, module(x), rtol=1e-5, atol=1e-5)
    weight, _ = _folded(folded)[0].folded()
    assert weight.is_contiguous(memory_format=torch.channels_last)


def test_a_resnet_runs_every_conv_and_norm_folded_in_inference():
    model = timm.create_model("resnet20", num_classes=10)
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    net = earlyexit.convert(model, n_exits=2).eval()
    stages = net.staged.inference_stages()
    assert sum(len(_folded(s)) for s in stages) == convs == 19  # the stem, 2 per block
    for stage in stages:
        assert not any(isinstance(m, nn.BatchNorm2d) for m in _called(stage))
    assert not any(_folded(s) for s in net.stages(training=False))


def test_early_exit_follows_weights_changed_after_inference():
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10, zero_init_last=False)
    net = earlyexit.convert(model, n_exits=2).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        net.early_exit(x)
    randomize_norms(net, seed=3)
    with torch.inference_mode():
        result = net.early_exit(x, threshold=2.0)
        torch.testing.assert_close(result.logits, net.forward_all(x).logits[-1])


def test_folding_can_be_turned_off_for_bit_exact_inference():
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10, zero_init_last=False).eval()
    randomize_norms(model)
    net = earlyexit.convert(model, n_exits=2).eval()
    x = torch.randn(4, 3, 32, 32)
    assert net.fold_batchnorm is True
    folded_stages = net.staged.inference_stages()
    with torch.no_grad():
        fast = net.early_exit(x, threshold=2.0).logits
        net.fold_batchnorm = False
        assert not any(_folded(s) for s in net.staged.inference_stages())
        exact = net.early_exit(x, threshold=2.0).logits
        expected = model(x)
    assert torch.equal(exact, expected)
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    net.fold_batchnorm = True
    assert net.staged.inference_stages()[0] is not folded_stages[0]  # made again
    with pytest.raises(TypeError, match="`fold_batchnorm` to be a bool"):
        net.fold_batchnorm = "yes"


def _resnet() -> earlyexit.EarlyExitNet:
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10, zero_init_last=False)
    randomize_norms(model)
    return earlyexit.convert(model, n_exits=2).eval()


def _agrees(net: earlyexit.EarlyExitNet, x: torch.Tensor) -> bool:
    with torch.no_grad():
        fast = net.early_exit(x, threshold=2.0).logits
        full = net.forward_all(x).logits[-1]
    return torch.allclose(fast, full, rtol=1e-4, atol=1e-4)


def test_changes_no_version_counter_sees_are_folded_again():
    net, x = _resnet(), torch.randn(4, 3, 32, 32)
    assert _agrees(net, x)
    first_bn = next(m for m in net.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    first_bn.eps = 0.5  # a plain attribute
    assert _agrees(net, x)
    net.train()  # a recalibration pass: running statistics move without a version bump
    with torch.no_grad():
        net.forward_all(3 * torch.randn(8, 3, 32, 32) + 1)
    net.eval()
    assert _agrees(net, x)
    with torch.no_grad():  # an edit through `.data` is invisible to the version counters...
        for p in net.backbone.parameters():
            p.data.mul_(0.9)
    net.eval()  # ...and switching the mode (again) folds everything anew
    assert _agrees(net, x)


def test_hooked_pruned_or_inference_weights_run_unfolded():
    net, x = _resnet(), torch.randn(4, 3, 32, 32)
    convs = [m for m in net.backbone.modules() if isinstance(m, nn.Conv2d)]
    handle = convs[3].register_forward_pre_hook(lambda m, args: (2 * args[0],))
    assert _agrees(net, x)  # the hook runs in both
    handle.remove()
    prune.l1_unstructured(convs[5], "weight", amount=0.5)
    assert _agrees(net, x)  # the pruned weight is recomputed by a hook: not folded
    with torch.inference_mode():
        made_there = _resnet()
    assert _agrees(made_there, x)  # inference tensors track no versions: not folded
