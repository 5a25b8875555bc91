"""Tracing mechanisms that real models need: sizes read from features, tuple outputs, in-place
ops, and clear errors for what cannot be traced."""

from __future__ import annotations

import copy
from collections import namedtuple

import pytest
import torch
from torch import nn

import earlyexit
from earlyexit.fx import analyse_model, split_graph


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU())


class BatchSizeAtTheTop(nn.Module):
    """Reads the batch size first and uses it at the end (twins, CoaT, PVT do this)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_block(3, 8), _block(8, 8), _block(8, 16), _block(16, 16))
        self.pool = nn.AvgPool2d(4)
        self.fc = nn.Linear(16 * 8 * 8, 5)

    def forward(self, x):
        b, _, h, w = x.shape
        x = self.pool(self.blocks(x))
        return self.fc(x.reshape(b, 16 * (h // 4) * (w // 4)))


class LateSizeRead(nn.Module):
    """Reads the input's shape after the blocks: that must not keep the input alive."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_block(3, 8), _block(8, 8), _block(8, 8))
        self.fc = nn.Linear(8, 5)
        self.scale = nn.Parameter(torch.ones(4, 8))

    def forward(self, image):
        x = self.blocks(image)
        x = x.flatten(2).mean(-1) * (image.shape[-1] / self.scale.shape[0])
        return self.fc(x)


class PositionsFromSize(nn.Module):
    """Builds a position embedding from the token grid once and adds it in every block."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.blocks = nn.ModuleList(nn.Linear(16, 16) for _ in range(4))
        self.pos = nn.Parameter(torch.randn(1, 1, 16))
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        pos = self.pos.expand(x.shape[0], x.shape[1], -1) * 0.1
        for block in self.blocks:
            x = x + torch.relu(block(x + pos))
        return self.head(x.mean(1))


AuxOutputs = namedtuple("AuxOutputs", ["logits", "aux"])


class AuxInTraining(nn.Module):
    """Returns a namedtuple with an auxiliary head in train mode (GoogLeNet, Inception)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_block(3, 8), _block(8, 8), _block(8, 8))
        self.aux = nn.Linear(8, 5)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.blocks(x).mean((2, 3))
        out = x.clone()
        out.mul_(2.0)  # an in-place op whose result is unused: it must survive pruning
        if self.training:
            return AuxOutputs(self.fc(out), self.aux(x))
        return self.fc(out)


def _check_early_exit_matches_forward_all(net: earlyexit.EarlyExitNet, x: torch.Tensor) -> None:
    net.eval()
    with torch.no_grad():
        out = net.forward_all(x)
        for head in net.heads:
            head.confidence.bias.zero_()
        out = net.forward_all(x)
        threshold = float(torch.sigmoid(out.confidence_logits[0]).median())
        result = net.early_exit(x, threshold=threshold)
    assert 0 < int((result.exit_index == 0).sum()) < len(x)
    picked = torch.stack(out.logits)[result.exit_index, torch.arange(len(x))]
    torch.testing.assert_close(result.logits, picked)


@pytest.mark.parametrize("cls", [BatchSizeAtTheTop, LateSizeRead, PositionsFromSize])
def test_sizes_do_not_hide_cut_points(cls):
    model = cls().eval()
    prof = earlyexit.profile(model, (3, 32, 32))
    assert len(prof.candidates) >= 3, prof.names()
    config = earlyexit.EarlyExitConfig(
        n_exits=3, exit_names=prof.names()[:3], input_size=(3, 32, 32)
    )
    net = earlyexit.convert(model, config)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval().forward_all(x).logits[-1], model(x))
    # A compacted batch reaches the later stages: their sizes come from their own input.
    _check_early_exit_matches_forward_all(net, x)


def test_size_is_rebuilt_from_the_stage_input():
    analysis = analyse_model(BatchSizeAtTheTop().eval(), (3, 32, 32))
    names = [c.name for c in analysis.cut_points]
    stages = split_graph(analysis.eval_graph, [names[1]])
    assert "_rebuilt_size" in stages[1].code
    with torch.no_grad():
        feature = stages[0](torch.randn(5, 3, 32, 32))
        assert stages[1](feature[:2]).shape == (2, 5)


def test_tuple_output_in_training_keeps_the_logits_and_inplace_ops():
    model = AuxInTraining()
    net = earlyexit.convert(model, n_exits=2, input_size=(3, 16, 16))
    x = torch.randn(4, 3, 16, 16)
    net.train()
    model.train()
    torch.testing.assert_close(net.forward_all(x).logits[-1], model(x).logits)
    net.eval()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(net.forward_all(x).logits[-1], model(x))


class AttachedTensors(nn.Module):
    """Tensors that tracing attaches to the stages: a constant, and a buffer and a parameter
    of a module that is traced through (not a leaf)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_block(3, 8), _block(8, 8), _block(8, 8))
        self.register_buffer("shift", torch.full((1, 8, 1, 1), 0.5))
        self.gain = nn.Parameter(torch.ones(1, 8, 1, 1))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.blocks[0](x) * torch.tensor(2.0)
        x = self.blocks[2](self.blocks[1](x) + self.shift) * self.gain
        return self.fc(x.mean((2, 3)))


def test_stages_share_the_weights_and_move_with_the_net():
    model = AttachedTensors()
    names = earlyexit.profile(model, (3, 16, 16)).names()[:2]
    config = earlyexit.EarlyExitConfig(2, exit_names=names, input_size=(3, 16, 16))
    net = earlyexit.convert(model, config)
    # The stages hold the backbone's own layers: the state dict names each weight once.
    assert all(k.startswith(("backbone.", "heads.")) for k in net.state_dict())
    assert len(net.state_dict()) == len(model.state_dict()) + len(net.heads.state_dict())
    assert {id(p) for p in net.parameters()} == {
        id(p) for p in (*model.parameters(), *net.heads.parameters())
    }
    x = torch.randn(4, 3, 16, 16)
    for training in (False, True):
        stages = net.stages(training=training)
        assert len(stages) == 3 and stages == net.staged.stages(training)
        owned = [t for s in stages for t in (*s.parameters(), *s.buffers())]
        assert any(t is model.shift for t in owned) and any(t is model.gain for t in owned)
    with torch.no_grad():
        torch.testing.assert_close(net.eval().staged(x), model.eval()(x))
    copy64 = copy.deepcopy(net).double()
    for training in (False, True):
        for stage in copy64.stages(training=training):
            floats = [t for t in (*stage.parameters(), *stage.buffers()) if t.is_floating_point()]
            assert floats and all(t.dtype == torch.float64 for t in floats)
    assert all(t.dtype == torch.float32 for t in net.parameters())
    with torch.no_grad():
        out = copy64.eval().forward_all(x.double())
        torch.testing.assert_close(out.logits[-1], model(x).double())
    assert "StagedGraph(3 stages" in repr(net)


def test_tracing_leaves_the_model_as_it_was():
    # torch.fx stows tensors made during tracing (`torch.tensor(2.0)`) on the traced root.
    model = AttachedTensors()
    before = dict(vars(model))
    net = earlyexit.convert(model, 2, exit_names=["mul", "add"], input_size=(3, 16, 16))
    assert vars(model).keys() == before.keys()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(net.eval().forward_all(x).logits[-1], model.eval()(x))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.mean((2, 3)))


class NeedsMask(DataDependent):
    def forward(self, x, mask):
        return super().forward(x * mask)


@pytest.mark.parametrize("cls", [DataDependent, NeedsMask])
def test_untraceable_models_fail_with_a_hint(cls):
    with pytest.raises(earlyexit.TraceError, match="Hint:"):
        earlyexit.convert(cls(), n_exits=1, input_size=(3, 16, 16))
