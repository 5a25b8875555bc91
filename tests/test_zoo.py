"""Real models that no one here wrote: timm and torchvision classifiers convert and keep the
invariants (stages reproduce the model, thresholds above 1 and at 0, costs, gradients, and the
user's model left alone).

The models are the smallest variants of each family (shrunk with their own constructor
arguments where they take them), at small inputs, so the whole file runs in the default suite.
`benchmarks/zoo.py` runs the same check over the whole of both zoos.
"""

from __future__ import annotations

from typing import Any

import pytest
import timm
import torch
import torchvision

import earlyexit

pytestmark = [pytest.mark.zoo, pytest.mark.timeout(120)]

# (name, constructor arguments, input side). Families first, then the odd ones out.
TIMM_MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("test_resnet", {}, 64),
    ("resnext50_32x4d", {"layers": (1, 1, 1, 1)}, 64),
    ("test_efficientnet", {}, 64),
    ("mobilenetv2_035", {}, 64),
    ("mobilenetv3_small_050", {}, 64),
    ("regnetx_002", {}, 64),
    ("test_convnext", {}, 64),
    ("densenet121", {"growth_rate": 8, "block_config": (2, 2, 2, 2)}, 64),
    ("inception_v3", {}, 75),
    ("dla46_c", {}, 64),
    ("cs3darknet_focus_s", {}, 64),
    ("cspresnet50", {}, 64),
    ("repvgg_a0", {}, 64),
    ("ghostnet_050", {}, 64),
    ("mobilevit_xxs", {}, 64),
    ("test_vit", {"img_size": 64}, 64),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64, "depth": 4}, 64),
    (
        "swin_tiny_patch4_window7_224",
        {
            "img_size": 64,
            "window_size": 4,
            "embed_dim": 24,
            "depths": (1, 1, 2, 1),
            "num_heads": (1, 1, 2, 2),
        },
        64,
    ),
    ("poolformer_s12", {}, 64),
    ("efficientformer_l1", {"depths": (1, 1, 1, 1)}, 224),
    ("levit_128s", {"img_size": 64}, 64),
    ("test_maxvit", {"img_size": 64}, 64),
    ("test_coatnet", {"img_size": 64}, 64),
    ("pvt_v2_b0", {}, 64),
    ("twins_pcpvt_small", {"depths": (1, 1, 1, 1)}, 64),
    ("xcit_nano_12_p16_224", {"img_size": 64, "depth": 4}, 64),
    ("cait_xxs24_224", {"img_size": 64, "depth": 4}, 64),
    ("edgenext_xx_small", {}, 64),
    ("fastvit_t8", {}, 64),
    ("efficientvit_b0", {}, 64),
    ("mobileone_s0", {}, 64),
    ("hgnetv2_b0", {}, 64),
    ("test_nfnet", {}, 64),
    ("test_byobnet", {}, 64),
    ("test_mambaout", {}, 64),
    ("dpn48b", {}, 64),
    ("mixer_s32_224", {"img_size": 64}, 64),
    ("eva02_tiny_patch14_224", {"img_size": 56, "depth": 4}, 56),
]

# (name, constructor arguments, input side); `torchvision.models.get_model(name, ...)`.
TORCHVISION_MODELS: list[tuple[str, dict[str, Any], int]] = [
    ("resnet18", {}, 64),
    ("mobilenet_v2", {}, 64),
    ("mobilenet_v3_small", {}, 64),
    ("shufflenet_v2_x0_5", {}, 64),
    ("squeezenet1_1", {}, 64),
    ("mnasnet0_5", {}, 64),
    ("regnet_y_400mf", {}, 64),
    ("efficientnet_b0", {}, 64),
    ("googlenet", {"aux_logits": True, "init_weights": True}, 64),
    ("alexnet", {}, 64),
    ("swin_t", {}, 64),
]


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=1e-5 * scale, rtol=1e-4)


def check_invariants(model: torch.nn.Module, side: int, n_exits: int) -> None:
    """Convert `model` at `(3, side, side)` and check every invariant of the contract."""
    model.eval()
    input_size = (3, side, side)
    x = torch.randn(3, *input_size)
    with torch.no_grad():
        ref = model(x)
    before = _state(model)
    flags = [m.training for m in model.modules()]

    net = earlyexit.convert(model, n_exits=n_exits, input_size=input_size)

    # The user's model is left as it was.
    after = model.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"convert changed {key}"
    assert [m.training for m in model.modules()] == flags
    assert net.num_exits == n_exits
    costs = net.exit_costs
    assert bool((costs[1:] > costs[:-1]).all()), costs.tolist()

    net.eval()
    with torch.no_grad():
        out = net.forward_all(x)
        _close(out.logits[-1], ref)
        never = net.early_exit(x, threshold=1.5)
        assert never.exit_index.tolist() == [n_exits] * len(x)
        _close(never.logits, ref)
        first = net.early_exit(x, threshold=0.0)
        assert first.exit_index.tolist() == [0] * len(x)
        _close(first.logits, out.logits[0])
        # Some samples leave at exit 0 and the rest go on, as a smaller batch.
        h0 = torch.sigmoid(out.confidence_logits[0])
        mixed = net.early_exit(x, threshold=float(h0.median()))
        picked = torch.stack(out.logits)[mixed.exit_index, torch.arange(len(x))]
        _close(mixed.logits, picked)
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"inference changed {key}"

    net.train()
    train_out = net.forward_all(x)
    loss = sum(z.mean() for z in train_out.logits)
    loss = loss + sum(a.mean() for a in train_out.confidence_logits)
    loss.backward()
    missing = [name for name, p in net.heads.named_parameters() if p.grad is None]
    assert not missing, f"no gradient reaches {missing}"


def _id(spec: tuple[str, dict[str, Any], int]) -> str:
    return spec[0]


@pytest.mark.parametrize("spec", TIMM_MODELS, ids=_id)
def test_timm_model(spec):
    name, kwargs, side = spec
    check_invariants(timm.create_model(name, num_classes=10, **kwargs), side, n_exits=3)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # googlenet's init_weights notice
@pytest.mark.parametrize("spec", TORCHVISION_MODELS, ids=_id)
def test_torchvision_model(spec):
    name, kwargs, side = spec
    model = torchvision.models.get_model(name, weights=None, num_classes=10, **kwargs)
    # AlexNet's classifier holds most of its MACs: no third exit fits under pareto's 0.488.
    check_invariants(model, side, n_exits=2 if name == "alexnet" else 3)


def test_parallel_streams_fail_with_a_hint():
    """CrossViT keeps two token streams alive from the stem to the head: no cut point."""
    model = timm.create_model("crossvit_tiny_240", num_classes=10)
    with pytest.raises(earlyexit.PlacementError, match="Hint:"):
        earlyexit.convert(model, n_exits=1, input_size=(3, 64, 64))
