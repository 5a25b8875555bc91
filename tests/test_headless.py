"""A model without a classifier (its head an identity, its output the pooled features) is refused.

Converting one would make an early-exit net whose "classes" are feature channels.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import timm
import torch
import torchvision
from torch import nn

import earlyexit
from earlyexit.errors import TraceError

pytestmark = pytest.mark.timeout(60)


def _timm_fc_replaced() -> nn.Module:
    model = timm.create_model("test_resnet", num_classes=10)
    model.fc = nn.Identity()
    return model


def _timm_reset_to_zero() -> nn.Module:
    model = timm.create_model("test_resnet", num_classes=10)
    model.reset_classifier(0)
    return model


def _torchvision(name: str, edit: Callable[[nn.Module], None]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = torchvision.models.get_model(name, weights=None, num_classes=10)
        edit(model)
        return model

    return make


def _set(attr: str) -> Callable[[nn.Module], None]:
    return lambda model: setattr(model, attr, nn.Identity())


def _set_last(attr: str) -> Callable[[nn.Module], None]:
    return lambda model: getattr(model, attr).__setitem__(-1, nn.Identity())


HEADLESS: dict[str, Callable[[], nn.Module]] = {
    "timm_num_classes_0": lambda: timm.create_model("test_resnet", num_classes=0),
    "ours_num_classes_0": lambda: timm.create_model("resnet20", num_classes=0),
    "timm_reset_classifier_0": _timm_reset_to_zero,
    "timm_fc_identity": _timm_fc_replaced,
    "torchvision_resnet_fc": _torchvision("resnet18", _set("fc")),
    "torchvision_mobilenet_classifier": _torchvision("mobilenet_v3_small", _set("classifier")),
    "torchvision_mobilenet_last_linear": _torchvision(
        "mobilenet_v3_small", _set_last("classifier")
    ),
    "torchvision_swin_head": _torchvision("swin_t", _set("head")),
}


@pytest.mark.parametrize("make", HEADLESS.values(), ids=HEADLESS.keys())
def test_headless_model_is_refused(make):
    model = make()
    with pytest.raises(TraceError, match=r"no classifier.*Hint: .*num_classes=K"):
        earlyexit.convert(model, n_exits=2, input_size=(3, 64, 64))


def test_headless_timm_message_names_the_model_and_the_fix():
    model = timm.create_model("test_resnet", num_classes=0)
    with pytest.raises(TraceError) as info:
        earlyexit.convert(model, n_exits=2, input_size=(3, 64, 64))
    message = str(info.value)
    assert "ResNet" in message and "num_classes=0" in message
    assert "reset_classifier(K)" in message


def test_headless_torchvision_message_names_the_attribute():
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    model.fc = nn.Identity()
    with pytest.raises(TraceError, match=r"`fc` is an nn.Identity.*Hint: .*model\.fc = "):
        earlyexit.convert(model, n_exits=2, input_size=(3, 64, 64))


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("test_resnet", num_classes=10),
        lambda: timm.create_model("resnet20", num_classes=1),
        lambda: torchvision.models.resnet18(weights=None, num_classes=10),
        lambda: torchvision.models.squeezenet1_1(weights=None, num_classes=10),
    ],
    ids=["test_resnet", "resnet20_one_class", "torchvision_resnet18", "squeezenet1_1"],
)
def test_classifiers_still_convert(make):
    model = make().eval()
    net = earlyexit.convert(model, n_exits=2, input_size=(3, 64, 64)).eval()
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(net.forward_all(x).logits[-1], model(x))
