"""`conv` exit heads run folded for early-exit inference (`earlyexit._head_folding`).

The invariants: with autograd off in eval mode a channels-first `conv` head's inference form
gives the values of its ops as written, up to float rounding (and exactly the max-softmax
prior untrained); it follows every tracked change of its weights; wherever it cannot stand
in for the ops (hooks, a norm in train mode, tracers, autograd on) the ops run as written;
and only early-exit inference uses it (`forward_all`, training and export never fold).
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import earlyexit
from earlyexit._head_folding import InferenceHead, inference_heads
from earlyexit.heads import CONFIDENCE_PRIOR, ExitHead, certainty

from toy_models import randomize_norms


class _Ops(TorchDispatchMode):
    """Records the ATen ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _head(shape, num_classes=10, layout=2, seed=0) -> ExitHead:
    torch.manual_seed(seed)
    head = ExitHead("conv", shape, 1, num_classes, layout=layout)
    for p in head.parameters():
        nn.init.normal_(p, std=0.3)
    randomize_norms(head)
    return head.eval()


def _input(shape, channels_last, batch=5) -> torch.Tensor:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(1))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _as_written(head: ExitHead, x: torch.Tensor):
    with torch.no_grad():
        return head(x)


def _folded(head: InferenceHead, x: torch.Tensor):
    with torch.no_grad():
        head(x)  # folds, where a source changed
        with _Ops() as ops:
            out = head(x)
    assert "native_batch_norm" not in ops.names and "cat" not in ops.names, ops.names
    return out


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "shape, layout, num_classes",
    [
        ((16, 32, 32), 2, 10),  # a 4×4 grid pooled to a 2×2 layout
        ((16, 32, 32), 1, 10),  # averaged into one cell
        ((8, 14, 14), 2, 5),  # 7 → a 2×2 grid kept as it is
        ((8, 7, 7), 2, 1),  # a 1×1 grid, one class
        ((64, 8, 8), 2, 2),
    ],
)
def test_folded_head_gives_the_ops_values(shape, layout, num_classes, channels_last):
    head = _head(shape, num_classes, layout)
    x = _input(shape, channels_last)
    expected = _as_written(head, x)
    logits, confidence = _folded(InferenceHead(head), x)
    torch.testing.assert_close(logits, expected[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(confidence, expected[1], rtol=1e-5, atol=1e-5)
    assert logits.is_contiguous() and confidence.shape == (len(x),)


@pytest.mark.parametrize("channels_last", [False, True])
def test_untrained_folded_confidence_is_exactly_the_prior(channels_last):
    head = ExitHead("conv", (16, 8, 8), 1, 10).eval()
    x = _input((16, 8, 8), channels_last, batch=64) * 4
    logits, confidence = _folded(InferenceHead(head), x)
    # The logit of its own top probability, plus the prior's bias, and nothing else.
    prior = certainty(logits)[:, 2] + head.confidence.bias
    torch.testing.assert_close(confidence, prior, rtol=0, atol=0)
    top = logits.double().softmax(dim=1).amax(dim=1)
    assert torch.equal(torch.sigmoid(confidence.double()) >= 0.5, top >= CONFIDENCE_PRIOR)


def _setup(channels_last: bool) -> tuple[ExitHead, InferenceHead, torch.Tensor]:
    """A head on (16, 8, 8) features, its inference form, and an input."""
    head = _head((16, 8, 8))
    return head, InferenceHead(head), _input((16, 8, 8), channels_last)


def _close(wrapper: InferenceHead, x: torch.Tensor) -> None:
    expected = _as_written(wrapper.head, x)
    torch.testing.assert_close(_folded(wrapper, x), expected, rtol=1e-5, atol=1e-5)


def test_folded_head_follows_tracked_changes_in_the_same_tensors():
    head, wrapper, x = _setup(channels_last=True)
    _folded(wrapper, x)
    folded = wrapper._folded
    kept = [folded._bias, *folded._matrices.values(), folded.folded_conv.folded()[0]]
    with torch.no_grad():
        head.classifier.weight.add_(0.5)  # an optimizer step bumps the version like this
        head.confidence.bias.sub_(1.0)
        head.conv[1].weight.mul_(1.5)
    _close(wrapper, x)
    head.train()
    head(x * 3)  # train mode updates the norm's running statistics
    head.eval()
    _close(wrapper, x)
    head.load_state_dict(_head(head.shape, seed=7).state_dict())
    _close(wrapper, x)
    # A captured CUDA graph reads the tensors handed out first: they were written in place.
    now = [folded._bias, *folded._matrices.values(), folded.folded_conv.folded()[0]]
    assert wrapper._folded is folded and all(a is b for a, b in zip(kept, now, strict=True))


def _net(**kwargs) -> earlyexit.EarlyExitNet:
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20", num_classes=5), n_exits=2, **kwargs)
    randomize_norms(net)
    return net.eval()


def test_early_exit_runs_the_folded_heads_and_sees_an_edit_after_a_mode_switch():
    net = _net()
    x = torch.randn(4, *net.input_size)
    with torch.no_grad(), _Ops() as ops:
        before = net.early_exit(x, threshold=2.0)
    assert "native_batch_norm" not in ops.names  # stages and heads folded
    assert all(isinstance(h, InferenceHead) for h in net._inference_heads())
    net.heads[0].classifier.weight.data.add_(1.0)  # no version bump: unseen until...
    with torch.no_grad():
        stale = net.early_exit(x, threshold=0.0).logits
        net.train().eval()  # ... a mode switch
        fresh = net.early_exit(x, threshold=0.0).logits
        expected = net.forward_all(x).logits[0]
    assert not torch.allclose(stale, fresh)
    torch.testing.assert_close(fresh, expected, rtol=1e-4, atol=1e-4)
    assert before.logits.shape == (4, 5)


def test_forward_all_training_and_fold_batchnorm_false_run_the_heads_as_written():
    net = _net()
    x = torch.randn(4, *net.input_size)
    with torch.no_grad(), _Ops() as ops:
        net.forward_all(x)
    assert "native_batch_norm" in ops.names
    net.fold_batchnorm = False
    assert net._inference_heads() == list(net.heads)
    net.fold_batchnorm = True
    net.train()
    assert net._inference_heads() == list(net.heads)


def test_hooks_train_mode_and_autograd_run_the_ops_as_written():
    head, wrapper, x = _setup(channels_last=True)
    seen = []
    for module in (head, head.classifier, head.conv[3]):
        handle = module.register_forward_hook(lambda m, i, o: seen.append(m))
        with torch.no_grad():
            wrapper(x)
        handle.remove()
    assert seen == [head, head.classifier, head.conv[3]]
    head.conv[2].train()  # the norm alone in train mode: batch statistics
    with torch.no_grad(), _Ops() as ops:
        wrapper(x)
    assert "native_batch_norm" in ops.names
    head.conv[2].eval()
    with _Ops() as ops:
        logits, _ = wrapper(x)
    assert "native_batch_norm" in ops.names and logits.requires_grad


def test_a_replaced_module_is_seen():
    head, wrapper, x = _setup(channels_last=False)
    _folded(wrapper, x)
    head.classifier = nn.Linear(head.classifier.in_features, 10)
    _close(wrapper, x)


def test_state_dict_and_copies_do_not_see_the_folded_form():
    net = _net()
    keys = list(net.state_dict())
    x = torch.randn(3, *net.input_size)
    with torch.no_grad():
        net.early_exit(x, threshold=2.0)
    assert list(net.state_dict()) == keys
    twin = copy.deepcopy(net)
    with torch.no_grad():
        twin.heads[1].classifier.weight.add_(1.0)
    for n in (twin, net):
        with torch.no_grad():
            got, expected = n.early_exit(x, threshold=2.0), n.forward_all(x)
        assert n._inference_heads()[0].head is n.heads[0]
        torch.testing.assert_close(got.logits, expected.logits[-1], rtol=1e-4, atol=1e-4)
        for wrapper in n._inference_heads():
            _close(wrapper, _input(wrapper.head.shape, False))


def test_autocast_gives_the_dtypes_of_the_ops_as_written():
    head, wrapper, x = _setup(channels_last=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _as_written(head, x)
        got = _folded(wrapper, x)
    assert [t.dtype for t in got] == [t.dtype for t in expected]
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.1)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_tracers_see_the_ops_as_written():
    _, wrapper, x = _setup(channels_last=False)
    with torch.no_grad():
        traced = torch.jit.trace(wrapper, (x,))
        program = torch.export.export(wrapper, (x,), strict=False)
    assert "batch_norm" in str(traced.inlined_graph)
    assert "batch_norm" in str(program.graph)


def test_heads_of_other_kinds_run_as_written():
    heads = [
        ExitHead("pool", (16, 8, 8), 1, 10),
        ExitHead("conv", (8, 8, 16), 3, 10),  # channels-last features: LayerNorm, Linear
        ExitHead("conv", (16, 8, 8), 1, 10),
    ]
    wrapped = inference_heads(heads)
    assert wrapped[:2] == heads[:2] and wrapped[2].head is heads[2]
    del heads[2]._fold_cell  # as a head unpickled from an earlier version
    assert inference_heads(heads) == heads


def test_an_empty_batch():
    wrapper = InferenceHead(_head((16, 8, 8)))
    with torch.no_grad():
        logits, confidence = wrapper(torch.empty(0, 16, 8, 8))
    assert logits.shape == (0, 10) and confidence.shape == (0,)
