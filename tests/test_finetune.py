"""Fine-tuning a pretrained model, the path most users take, with the library's defaults.

A plain ResNet-8 trained on scikit-learn's digits stands in for pretrained weights. Then:

- with a frozen backbone, the final exit is the original model, bit for bit, and the trained
  exits give a trade-off: some samples leave early at the default threshold;
- unfrozen, `EENetLoss()` with `convert`'s defaults keeps the final exit's accuracy.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import earlyexit
from earlyexit.demo import load_digits_data
from earlyexit.training import evaluate, freeze_backbone, param_groups, train_one_epoch

pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn")


@pytest.fixture(scope="module")
def pretrained():
    """A plain ResNet-8 trained on digits, its test loader and its test accuracy."""
    torch.manual_seed(0)
    train, test = load_digits_data(seed=0)
    model = timm.create_model("resnet8", width=8, in_chans=1, num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = DataLoader(
        train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(0)
    )
    for epoch in range(8):
        train_one_epoch(
            model, loader, nn.CrossEntropyLoss(), optimizer, epoch=epoch, progress=False
        )
    model.eval()
    test_loader = DataLoader(test, batch_size=150)
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in test_loader)
    accuracy = hits / len(test)
    assert accuracy > 0.9, f"the stand-in for pretrained weights is too weak: {accuracy:.3f}"
    return model.state_dict(), loader, test_loader, accuracy


def _fresh(pretrained) -> nn.Module:
    model = timm.create_model("resnet8", width=8, in_chans=1, num_classes=10)
    model.load_state_dict(pretrained[0])
    return model


def _train_exits(net: earlyexit.EarlyExitNet, loader, epochs: int, backbone_lr: float) -> None:
    # The new exits learn fast, the pretrained backbone (if it learns at all) slowly.
    optimizer = torch.optim.Adam(param_groups(net, lr=1e-2, backbone_lr=backbone_lr))
    criterion = earlyexit.EENetLoss()
    for epoch in range(epochs):
        train_one_epoch(net, loader, criterion, optimizer, epoch=epoch, progress=False)


def test_frozen_backbone_keeps_the_original_bit_for_bit(pretrained):
    original = _fresh(pretrained).eval()
    net = freeze_backbone(earlyexit.convert(_fresh(pretrained), n_exits=2, dist="quadratic"))
    _train_exits(net, pretrained[1], epochs=4, backbone_lr=0.0)
    net.eval()
    x = torch.cat([x for x, _ in pretrained[2]])
    with torch.no_grad():
        reference = original(x)
        assert torch.equal(net.forward_all(x).logits[-1], reference)  # the final exit
        never = net.early_exit(x, threshold=2.0)  # batch norms folded: equal up to rounding
        torch.testing.assert_close(never.logits, reference, rtol=1e-5, atol=1e-5)
        net.fold_batchnorm = False
        assert torch.equal(net.early_exit(x, threshold=2.0).logits, reference)
        net.fold_batchnorm = True
    assert torch.equal(never.exit_index, torch.full_like(never.exit_index, 2))
    report = evaluate(net, pretrained[2], progress=False)
    # The exits are used at the default threshold, and the accuracy stays close.
    assert report.exit_counts[2] < report.num_samples, report
    assert report.cost < 0.95, report
    assert report.accuracy >= pretrained[3] - 0.015, (report.accuracy, pretrained[3])


def test_unfrozen_fine_tuning_keeps_the_final_exit(pretrained):
    net = earlyexit.convert(_fresh(pretrained), n_exits=2, dist="quadratic")
    _train_exits(net, pretrained[1], epochs=4, backbone_lr=1e-3)
    report = evaluate(net, pretrained[2], progress=False)
    final = report.exit_accuracy[-1]
    # The digits test split has 450 images: 0.3 points is about one image.
    assert final >= pretrained[3] - 0.003, (final, pretrained[3])
