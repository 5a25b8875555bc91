"""Every function that runs a net in eval mode for a while gives each module its own mode back."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import earlyexit
from earlyexit._modes import set_mode
from earlyexit.calibrate import calibrate, tradeoff_curve
from earlyexit.demo import tradeoff
from earlyexit.export import export_stages
from earlyexit.training import evaluate

from toy_models import ToyNet

SIZE = (3, 16, 16)


def modes(net: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in net.named_modules()}


@pytest.fixture
def net() -> earlyexit.EarlyExitNet:
    """A train-mode net whose user put one BatchNorm in eval mode on purpose."""
    torch.manual_seed(0)
    net = earlyexit.convert(ToyNet(), n_exits=2, dist="linear", input_size=SIZE).train()
    net.backbone.blocks[1].bn.eval()
    return net


@pytest.fixture
def loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(12, *SIZE, generator=gen), torch.randint(0, 5, (12,)))
    return DataLoader(data, batch_size=6)


RUNS = {
    "evaluate": lambda net, loader: evaluate(net, loader, progress=False),
    "tradeoff_curve": lambda net, loader: tradeoff_curve(net, loader, progress=False),
    "calibrate": lambda net, loader: calibrate(net, loader, max_accuracy_drop=1.0, progress=False),
    "demo_tradeoff": lambda net, loader: tradeoff(net, loader),
    "export_stages": lambda net, loader: export_stages(net, torch.randn(2, *SIZE)),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_each_module_keeps_its_own_mode(net, loader, run):
    before = modes(net)
    assert not before["backbone.blocks.1.bn"] and before["backbone.blocks.0.bn"]
    RUNS[run](net, loader)
    assert modes(net) == before


@pytest.mark.parametrize("run", ["evaluate", "tradeoff_curve"])
def test_modes_come_back_after_an_error(net, run):
    before = modes(net)
    with pytest.raises(ValueError, match="shape"):
        RUNS[run](net, [(torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))])
    assert modes(net) == before


def test_set_mode_restores_each_flag_even_after_an_error():
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.BatchNorm1d(2))
    net[2].eval()
    with pytest.raises(RuntimeError), set_mode(net, False) as same:
        assert same is net and not any(m.training for m in net.modules())
        raise RuntimeError
    assert [m.training for m in net.modules()] == [True, True, True, False]
    with set_mode(net.eval(), True):
        assert all(m.training for m in net.modules())
    assert not any(m.training for m in net.modules())
