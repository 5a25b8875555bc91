"""Placement never wastes an exit: every early exit costs less than the original model.

A sample that leaves at exit i costs c_i, the backbone up to the exit plus every head it passed
through. `convert` places an exit only where c_i < 1, squeezes the rule's picks back when it
must (with a warning), and warns when two exits are less than half a block apart.
"""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import earlyexit
from earlyexit.errors import EarlyExitWarning, PlacementError
from earlyexit.heads import EXIT_TYPES
from earlyexit.model import _head_macs
from earlyexit.placement import fit_exits, place_exits, useful_candidates

pytestmark = pytest.mark.timeout(60)


def convert_quietly(model, **kwargs):
    """Convert, returning the net and the messages of the EarlyExitWarnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        net = earlyexit.convert(model, **kwargs)
    return net, [str(w.message) for w in caught if issubclass(w.category, EarlyExitWarning)]


def assert_every_exit_is_cheaper_than_the_model(net) -> None:
    costs = net.exit_costs.tolist()
    assert all(c < 1.0 for c in costs[:-1]), list(zip(net.exit_names, costs))
    assert costs[-1] > 1.0


# --- the rule on numbers --------------------------------------------------------------------


def test_a_candidate_that_saves_less_than_its_head_is_dropped():
    fractions = [0.2, 0.5, 0.9, 0.995, 0.999]
    heads = [0.004] * 5
    assert useful_candidates(fractions, heads) == [0, 1, 2, 3]
    plan = fit_exits(fractions, heads, [0.1, 0.4])
    assert plan.picks == [0, 1] and plan.dropped == [4]
    assert plan.squeezed == [] and plan.crowded == []


def test_without_pressure_the_rule_places_the_exits():
    fractions = [i / 20 for i in range(1, 20)]
    targets = earlyexit.distribution_targets("pareto", 5)
    plan = fit_exits(fractions, [1e-4] * len(fractions), targets)
    assert plan.picks == place_exits(fractions, targets)
    assert plan.squeezed == [] and plan.crowded == []


def test_heads_carried_by_later_exits_squeeze_them_back():
    # Alone, an exit at 0.98 is cheap; the fourth exit carries three heads before its own.
    fractions = [0.2, 0.4, 0.6, 0.8, 0.98]
    heads = [0.006] * 5
    plan = fit_exits(fractions, heads, [0.3, 0.5, 0.7, 0.95])
    assert place_exits(fractions, [0.3, 0.5, 0.7, 0.95]) == [1, 2, 3, 4]  # 0.98 + 4 heads ≥ 1
    assert plan.picks == [0, 1, 2, 3] and plan.squeezed == [0, 1, 2, 3]


def test_targets_past_the_last_candidate_squeeze_instead_of_failing():
    fractions = [0.1, 0.2, 0.3, 0.4]
    targets = [0.2, 0.36, 0.488]
    with pytest.raises(PlacementError):
        place_exits(fractions, targets)
    plan = fit_exits(fractions, [0.001] * 4, targets)
    assert plan.picks == [1, 2, 3] and plan.squeezed == [1, 2]


def test_fewer_useful_candidates_than_exits_is_an_error():
    with pytest.raises(PlacementError, match=r"only 2 where an exit costs less.*Hint:"):
        fit_exits([0.3, 0.6, 0.9999], [0.001] * 3, [0.2, 0.4, 0.6])


def test_heads_that_cannot_all_be_cheaper_than_the_model_are_an_error():
    with pytest.raises(PlacementError, match=r"cannot all cost less than the model.*Hint:"):
        fit_exits([0.2, 0.4, 0.6, 0.8], [0.15] * 4, [0.2, 0.4, 0.6])


def test_exits_less_than_half_a_block_apart_are_crowded():
    fractions = [0.1, 0.2, 0.3, 0.31, 0.4, 0.5]
    plan = fit_exits(fractions, [1e-4] * 6, [0.25, 0.305, 0.45])
    assert plan.picks == [2, 3, 5]
    assert plan.block == pytest.approx(0.1) and plan.crowded == [1]


@settings(max_examples=300, deadline=None)
@given(
    fractions=st.lists(st.floats(0.001, 0.9999), min_size=1, max_size=30, unique=True).map(sorted),
    head=st.floats(0.0, 0.05),
    targets=st.lists(st.floats(0.001, 0.999), min_size=1, max_size=8, unique=True).map(sorted),
)
def test_every_placed_exit_is_cheaper_than_the_model(fractions, head, targets):
    heads = [head * (1 + (k % 3)) for k in range(len(fractions))]
    try:
        plan = fit_exits(fractions, heads, targets)
    except PlacementError:
        assert len(useful_candidates(fractions, heads)) < len(targets) or head > 0
        return
    picks = plan.picks
    assert len(picks) == len(targets) and all(a < b for a, b in zip(picks, picks[1:]))
    spent = 0.0
    for k in picks:
        spent += heads[k]
        assert fractions[k] + spent < 1.0
    useful = useful_candidates(fractions, heads)
    try:
        rule = [useful[k] for k in place_exits([fractions[k] for k in useful], targets)]
    except PlacementError:
        assert plan.squeezed
    else:
        moved = [i for i in range(len(targets)) if picks[i] != rule[i]]
        assert moved == plan.squeezed
        assert all(p <= r for p, r in zip(picks, rule))


# --- real models (pool heads, the paper's, whatever the default) ----------------------------


def test_vit_exits_after_the_last_block_are_not_placed():
    # Before: `blocks.11` (the last block) and `norm` took exits 8 and 9, at costs 1.016 and 1.019.
    model = timm.create_model("vit_tiny_patch16_224", img_size=64)
    net, notes = convert_quietly(model, n_exits=10, exit_type="pool", input_size=(3, 64, 64))
    assert_every_exit_is_cheaper_than_the_model(net)
    assert "blocks.11" not in net.exit_names and "norm" not in net.exit_names
    assert net.exit_names == [f"blocks.{i}" for i in range(1, 11)]
    assert any("squeezed" in n and "Hint:" in n for n in notes), notes


def test_resnet50_last_block_gets_no_exit():
    # Before: `layer4.2` (the last block, pooled next) took exit 9 at cost 1.030.
    model = timm.create_model("resnet50")
    net, notes = convert_quietly(model, n_exits=10, exit_type="pool", input_size=(3, 64, 64))
    assert_every_exit_is_cheaper_than_the_model(net)
    assert "layer4.2" not in net.exit_names and "global_pool.pool" not in net.exit_names
    assert any("squeezed" in n for n in notes), notes


def test_mobilenet_v3_small_exits_stay_cheaper_than_the_model():
    # Before: `features.12` and `avgpool` took exits 8 and 9, at costs 1.003 and 1.013.
    model = torchvision.models.mobilenet_v3_small(weights=None)
    net, _ = convert_quietly(model, n_exits=10, exit_type="pool", input_size=(3, 224, 224))
    assert_every_exit_is_cheaper_than_the_model(net)
    assert "features.12" not in net.exit_names and "avgpool" not in net.exit_names


def test_convnext_exits_on_the_same_block_warn():
    # `stages.2`'s last block and the LayerNorm that starts `stages.3.downsample`: 0.8% of the
    # model apart.
    model = timm.create_model("convnext_atto")
    net, notes = convert_quietly(model, n_exits=10, exit_type="pool", input_size=(3, 64, 64))
    assert_every_exit_is_cheaper_than_the_model(net)
    crowded = [n for n in notes if "half a block apart" in n]
    assert len(crowded) == 1 and "(stages.2.blocks.5) and 7 (stages.3.downsample.0)" in crowded[0]


def test_resnet20_keeps_its_placement_and_is_quiet():
    model = timm.create_model("resnet20")
    for dist, names in {
        "pareto": ["layer1.1", "layer1.2", "layer2.1"],
        "linear": ["layer1.2", "layer2.1", "layer3.0"],
    }.items():
        net, notes = convert_quietly(model, n_exits=3, dist=dist, exit_type="pool")
        assert net.exit_names == names and notes == []


def test_resnet20_pooled_features_get_no_exit():
    # `global_pool.pool` is a candidate (a 64×1×1 feature) but an exit there saves nothing.
    model = timm.create_model("resnet20")
    prof = earlyexit.profile(model)
    assert prof.names()[-1] == "global_pool.pool"
    with pytest.raises(PlacementError, match="Hint:"):
        earlyexit.convert(model, n_exits=len(prof.candidates), exit_type="pool")


@pytest.mark.parametrize("exit_type", EXIT_TYPES)
@pytest.mark.parametrize(
    ("name", "size"), [("resnet20", (3, 32, 32)), ("test_vit", (3, 64, 64))], ids=["nchw", "tokens"]
)
def test_placement_counts_heads_as_the_net_does(name, size, exit_type):
    kwargs = {"img_size": 64} if name == "test_vit" else {}
    model = timm.create_model(name, num_classes=10, **kwargs)
    net, _ = convert_quietly(model, n_exits=2, exit_type=exit_type, input_size=size)
    for head, macs in zip(net.heads, net.head_macs):
        assert _head_macs(exit_type, head.shape, head.channel_axis, 10) == macs
    assert_every_exit_is_cheaper_than_the_model(net)


@pytest.mark.parametrize("exit_type", EXIT_TYPES)
@pytest.mark.parametrize(("shape", "axis"), [((16, 32, 32), 1), ((17, 64), 2), ((64, 1, 1), 1)])
def test_counting_a_head_leaves_the_random_state_alone(exit_type, shape, axis):
    # The net's heads are created after placement: they must start as they would have.
    state = torch.get_rng_state()
    assert _head_macs(exit_type, shape, axis, 10) > 0
    assert torch.equal(torch.get_rng_state(), state)
