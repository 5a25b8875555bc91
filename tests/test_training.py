"""Training helpers: freezing, parameter groups, the epoch loop and evaluation."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import earlyexit
import earlyexit.training
from earlyexit.training import (
    Evaluation,
    collect_exit_cache,
    evaluate,
    freeze_backbone,
    param_groups,
    select_exits,
    train_one_epoch,
)

from toy_models import ToyNet

SIZE = (3, 16, 16)


def toy_net(n_exits: int = 2) -> earlyexit.EarlyExitNet:
    return earlyexit.convert(ToyNet(), n_exits=n_exits, dist="linear", input_size=SIZE)


def toy_data(n: int = 24, num_classes: int = 5, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(
        torch.randn(n, *SIZE, generator=gen), torch.randint(0, num_classes, (n,), generator=gen)
    )


def test_freeze_backbone_leaves_backbone_grads_none():
    net = freeze_backbone(toy_net())
    out = net(torch.randn(4, *SIZE))
    earlyexit.EENetLoss()(out, torch.randint(0, 5, (4,))).backward()
    assert all(p.grad is None for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.heads.parameters())


def test_freeze_backbone_keeps_norm_statistics_and_unfreezes():
    net = freeze_backbone(toy_net())
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    net.train()
    net(torch.randn(8, *SIZE))
    for k, v in net.backbone.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)

    freeze_backbone(net, freeze=False)
    assert all(p.requires_grad for p in net.backbone.parameters())
    net.train()
    net(torch.randn(8, *SIZE))
    changed = [k for k, v in net.backbone.state_dict().items() if "running_mean" in k]
    assert changed and any(
        not torch.equal(net.backbone.state_dict()[k], before[k]) for k in changed
    )


def test_freeze_backbone_rejects_a_plain_model():
    with pytest.raises(TypeError, match="EarlyExitNet"):
        freeze_backbone(ToyNet())


def test_param_groups_split_backbone_exits_and_decay():
    net = toy_net()
    groups = param_groups(net, lr=0.1, backbone_lr=0.01, weight_decay=1e-4)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "exits", "exits_no_decay"}
    backbone = {id(p) for p in net.backbone.parameters()}
    for name, g in by_name.items():
        assert g["lr"] == (0.01 if name.startswith("backbone") else 0.1)
        assert g["weight_decay"] == (0.0 if name.endswith("no_decay") else 1e-4)
        for p in g["params"]:
            assert (id(p) in backbone) == name.startswith("backbone")
            assert (p.ndim <= 1) == name.endswith("no_decay")
    # Every trainable parameter exactly once.
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in net.parameters())
    torch.optim.AdamW(groups)


def test_param_groups_skip_frozen_parameters_and_take_plain_models():
    groups = param_groups(freeze_backbone(toy_net()), lr=0.1)
    assert {g["name"] for g in groups} == {"exits", "exits_no_decay"}
    groups = param_groups(ToyNet(), lr=0.1)
    assert {g["name"] for g in groups} == {"exits", "exits_no_decay"}
    with pytest.raises(ValueError, match="lr"):
        param_groups(toy_net(), lr=-1.0)


def test_train_one_epoch_returns_mean_loss_and_learns():
    net = toy_net()
    loader = DataLoader(toy_data(), batch_size=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    criterion = earlyexit.EENetLoss()
    losses = [
        train_one_epoch(net, loader, criterion, optimizer, epoch=e, progress=False)
        for e in range(5)
    ]
    assert all(isinstance(v, float) and v > 0 for v in losses)
    assert losses[-1] < losses[0]


def test_train_one_epoch_takes_a_plain_classifier():
    model = ToyNet()
    loader = DataLoader(toy_data(), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = train_one_epoch(model, loader, nn.CrossEntropyLoss(), optimizer, progress=False)
    assert isinstance(loss, float) and loss > 0
    assert model.training


class NaNAfter(nn.Module):
    """A criterion that returns NaN from its `step`-th call."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.calls = step, 0

    def forward(self, outputs, target):
        loss = earlyexit.EENetLoss()(outputs, target)
        self.calls += 1
        return loss * float("nan") if self.calls > self.step else loss


def test_nan_loss_raises_naming_epoch_and_step():
    net = toy_net()
    loader = DataLoader(toy_data(), batch_size=8)
    optimizer = torch.optim.Adam(net.parameters())
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(earlyexit.EarlyExitError, match=r"nan at epoch 3, step 2"):
        train_one_epoch(net, loader, NaNAfter(2), optimizer, epoch=3, progress=False)
    # The NaN step never reached the weights (two good steps did).
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True))


def test_inf_loss_raises_without_an_epoch():
    net = toy_net()
    loader = DataLoader(toy_data(), batch_size=8)

    def criterion(outputs, target):
        return outputs.logits[0].sum() * float("inf")

    with pytest.raises(earlyexit.EarlyExitError, match=r"inf at step 0"):
        train_one_epoch(net, loader, criterion, torch.optim.SGD(net.parameters()), progress=False)


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3, 0.5, 0.7, 1.5])
@pytest.mark.parametrize("n_exits", [1, 3])
def test_evaluate_equals_a_direct_computation(threshold, n_exits):
    net = toy_net(n_exits)
    # Spread the confidences so that samples leave at every exit.
    for head in net.heads:
        nn.init.normal_(head.confidence.weight, std=3.0)
    data = toy_data(40)
    net.train()
    result = evaluate(net, DataLoader(data, batch_size=16), threshold=threshold, progress=False)
    assert net.training  # the mode comes back

    net.eval()
    x, y = data.tensors
    with torch.no_grad():
        direct = net.early_exit(x, threshold=threshold)
        outputs = net.forward_all(x)
    assert isinstance(result, Evaluation)
    assert result.num_samples == 40
    assert result.threshold == (net.threshold if threshold is None else threshold)
    # Counted exactly: a float32 mean would round 7/40 to 0.17499999...
    assert result.accuracy == (direct.logits.argmax(1) == y).sum().item() / 40
    assert result.cost == pytest.approx(direct.cost.double().mean().item(), rel=1e-12)
    expected_counts = torch.bincount(direct.exit_index, minlength=n_exits + 1).tolist()
    assert result.exit_counts == expected_counts
    assert result.exit_accuracy == [(z.argmax(1) == y).sum().item() / 40 for z in outputs.logits]
    assert result.exit_costs == net.exit_costs.tolist()
    torch.testing.assert_close(
        select_exits(outputs, net.threshold if threshold is None else threshold), direct.exit_index
    )


def test_evaluation_prints_a_table():
    net = toy_net()
    text = str(evaluate(net, DataLoader(toy_data(), batch_size=8), progress=False))
    lines = text.splitlines()
    assert lines[0].split() == ["cost", "leave", "share", "own", "acc"]
    assert [ln.split()[0] for ln in lines[1:-1]] == ["exit", "exit", "final"]
    assert lines[-1].startswith("accuracy ")
    assert "24 samples" in lines[-1]


def test_evaluate_rejects_bad_input():
    with pytest.raises(TypeError, match="EarlyExitNet"):
        evaluate(ToyNet(), [], progress=False)
    with pytest.raises(ValueError, match="at least one sample"):
        evaluate(toy_net(), [], progress=False)
    with pytest.raises(TypeError, match="inputs, targets"):
        evaluate(toy_net(), [torch.randn(2, *SIZE)], progress=False)


def test_evaluate_checks_inputs_and_targets_as_calibration_does():
    net = toy_net()
    x, y = toy_data(4).tensors
    with pytest.raises(ValueError, match=r"shape \(B, 3, 16, 16\).*Hint"):
        evaluate(net, [(torch.randn(4, 3, 8, 8), y)], progress=False)
    with pytest.raises(ValueError, match=r"targets of shape \(4,\).*Hint"):
        evaluate(net, [(x, torch.nn.functional.one_hot(y, 5))], progress=False)
    with pytest.raises(TypeError, match=r"inputs `x`.*tensor"):
        evaluate(net, [(x.tolist(), y)], progress=False)
    with pytest.raises(ValueError, match="at least one sample"):
        evaluate(net, [(x[:0], y[:0])], progress=False)


def test_evaluate_takes_lists_and_extra_items():
    net = toy_net()
    x, y = toy_data(8).tensors
    as_pairs = evaluate(net, [(x, y)], progress=False)
    as_lists = evaluate(
        net, [[x[:5], y[:5].tolist(), "extra"], [x[5:], y[5:], None]], progress=False
    )
    assert as_lists == as_pairs


@pytest.mark.parametrize("batch", [{"x": 1, "y": 2}, "xy", (torch.randn(2, *SIZE),)])
def test_one_batch_rule_for_training_and_evaluation(batch):
    net = toy_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    criterion = earlyexit.EENetLoss()
    for run in (
        lambda: evaluate(net, [batch], progress=False),
        lambda: earlyexit.tradeoff_curve(net, [batch], progress=False),
        lambda: train_one_epoch(net, [batch], criterion, optimizer, progress=False),
    ):
        with pytest.raises(TypeError, match=r"\(inputs, targets\).*\(x, y\).*Hint"):
            run()


@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.5, 0.9, 2.0])
def test_evaluate_agrees_with_the_tradeoff_curve(threshold):
    net = toy_net(3)
    for head in net.heads:
        nn.init.normal_(head.confidence.weight, std=3.0)
    loader = DataLoader(toy_data(40), batch_size=16)
    result = evaluate(net, loader, threshold=threshold, progress=False)
    curve = earlyexit.tradeoff_curve(net, loader, [threshold], progress=False)
    assert result.exit_counts == curve.exit_counts[0]
    assert result.accuracy == curve.accuracy[0]
    assert result.cost == curve.mean_cost[0]
    assert result.exit_accuracy == curve.exit_accuracy
    assert result.exit_costs == curve.exit_costs


def test_one_pass_gives_every_threshold():
    net = toy_net(2)
    loader = DataLoader(toy_data(24), batch_size=8)
    cache = collect_exit_cache(net, loader, progress=False)
    assert cache.confidence.shape == (24, 2) and cache.confidence.dtype == np.float32
    assert cache.correct.shape == (24, 3) and cache.correct.dtype == np.bool_
    assert cache.costs.tolist() == net.exit_costs.tolist() and cache.num_samples == 24
    for t in (0.0, 0.5, 1.5):
        assert Evaluation.from_cache(cache, t) == evaluate(net, loader, t, progress=False)


def test_progress_bars_can_be_shown(capsys):
    net = toy_net()
    loader = DataLoader(toy_data(), batch_size=8)
    optimizer = torch.optim.Adam(net.parameters())
    train_one_epoch(net, loader, earlyexit.EENetLoss(), optimizer, epoch=0, progress=True)
    evaluate(net, loader, progress=True)
    assert "epoch 0" in capsys.readouterr().err


def test_docstring_examples_run():
    timm.create_model("resnet8")  # registered on import
    result = doctest.testmod(earlyexit.training, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0
