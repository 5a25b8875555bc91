"""Invariants of `convert`, `EarlyExitNet` and batched early-exit inference."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

import earlyexit
from earlyexit.inference import _select, exit_mask
from earlyexit.placement import place_exits

from toy_models import BranchyNet, FeatureNet, ToyNet, randomize_confidences

CL = torch.channels_last
DISTRIBUTIONS = ["pareto", "golden_ratio", "fine", "linear", "quadratic"]
EXIT_TYPES = ["plain", "pool", "bnpool", "conv"]


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, int, int] | None]:
    if name == "toy":
        return ToyNet(), (3, 16, 16)
    if name == "test_resnet":
        return timm.create_model(name, num_classes=7), (3, 48, 48)
    return timm.create_model(name, num_classes=7), None


def _spread_confidences(net: earlyexit.EarlyExitNet, x: torch.Tensor, scale: float = 50.0) -> None:
    """Random heads put every h near 0.5: make the confidence branches decisive, each one
    sending about half of the batch `x` out (so that every exit gets samples)."""
    randomize_confidences(net, scale)
    with torch.no_grad():
        out = net.forward_all(x)
        for head, a in zip(net.heads, out.confidence_logits):
            # Midway between the two middle logits: no sample sits on the threshold, where
            # a layout's or a dtype's rounding would decide its exit.
            s = a.sort().values
            head.confidence.bias.fill_(-((s[(len(s) - 1) // 2] + s[len(s) // 2]) / 2).item())


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dist", DISTRIBUTIONS)
@pytest.mark.parametrize("name", ["resnet20", "test_resnet", "toy"])
def test_stages_reproduce_the_original(name, dist):
    model, size = _model(name)
    model.eval()
    net = earlyexit.convert(model, n_exits=3, dist=dist, input_size=size).eval()
    x = torch.randn(4, *net.input_size)
    with torch.no_grad():
        out = net.forward_all(x)
        ref = model(x)
    torch.testing.assert_close(out.logits[-1], ref)
    assert len(out.logits) == 4 and len(out.confidence_logits) == 3
    assert all(z.shape == ref.shape for z in out.logits)
    assert all(a.shape == (4,) for a in out.confidence_logits)


@pytest.mark.parametrize("exit_type", EXIT_TYPES)
@pytest.mark.parametrize("name", ["resnet20", "toy"])
def test_thresholds_above_one_and_zero(name, exit_type):
    model, size = _model(name)
    net = earlyexit.convert(model.eval(), n_exits=2, exit_type=exit_type, input_size=size).eval()
    x = torch.randn(6, *net.input_size)
    with torch.no_grad():
        ref = model(x)
        never = net.early_exit(x, threshold=1.01)
        always = net.early_exit(x, threshold=0.0)
        first = net.forward_all(x).logits[0]
    assert never.exit_index.tolist() == [2] * 6
    torch.testing.assert_close(never.logits, ref)
    torch.testing.assert_close(never.cost, net.exit_costs[[2] * 6])
    assert always.exit_index.tolist() == [0] * 6
    torch.testing.assert_close(always.logits, first)


def _rule(confidence_logits: list[torch.Tensor], threshold: float) -> torch.Tensor:
    """The exit the paper's rule picks from all exits' confidences: the first with h >= T."""
    n = len(confidence_logits)
    leave = torch.stack(
        [exit_mask(a, threshold) for a in confidence_logits]
        + [torch.ones_like(confidence_logits[0], dtype=torch.bool)]
    )
    return leave.int().argmax(0) if n else torch.zeros(0)


@pytest.mark.parametrize("exit_type", EXIT_TYPES)
@pytest.mark.parametrize("name", ["resnet20", "test_resnet"])
def test_each_sample_gets_its_exit_whatever_the_batch(name, exit_type):
    model, size = _model(name)
    net = earlyexit.convert(model, n_exits=3, exit_type=exit_type, input_size=size).eval()
    x = torch.randn(64, *net.input_size)
    _spread_confidences(net, x)
    with torch.no_grad():
        full = net.forward_all(x)
        batched = net.early_exit(x)
        alone = [net.early_exit(x[i : i + 1]) for i in range(len(x))]
    expected = _rule(full.confidence_logits, net.threshold)
    # A sample whose confidence lies within float noise of T could go either way.
    h = torch.stack([torch.sigmoid(a) for a in full.confidence_logits])
    clear = ((h - net.threshold).abs() > 1e-4).all(0)
    assert clear.sum() >= 60
    counts = torch.bincount(expected, minlength=4)
    assert (counts > 0).sum() >= 3, f"the test needs samples at several exits, got {counts}"
    assert torch.equal(batched.exit_index[clear], expected[clear])
    for i in torch.nonzero(clear).flatten().tolist():
        k = int(expected[i])
        torch.testing.assert_close(batched.logits[i], full.logits[k][i])
        assert alone[i].exit_index.item() == k
        torch.testing.assert_close(alone[i].logits[0], batched.logits[i])
        assert batched.cost[i].item() == pytest.approx(net.exit_costs[k].item())


def test_eval_forward_is_early_exit_and_train_forward_is_exit_outputs():
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2)
    x = torch.randn(3, 3, 32, 32)
    out = net.train()(x)
    assert isinstance(out, earlyexit.ExitOutputs)
    assert out.costs is net.exit_costs
    net.eval()
    _spread_confidences(net, x)
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.early_exit(x).logits)


def test_empty_batch():
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2).eval()
    with torch.no_grad():
        res = net.early_exit(torch.randn(0, 3, 32, 32))
    assert res.logits.shape == (0, 10) and res.exit_index.shape == (0,)


def test_exit_costs_increase_and_final_cost_is_near_one():
    net = earlyexit.convert(timm.create_model("resnet110"), n_exits=10, dist="pareto")
    costs = net.exit_costs
    assert torch.all(costs[1:] > costs[:-1])
    assert 1.0 < costs[-1].item() < 1.01
    assert sum(net.stage_macs) == net.backbone_macs
    assert len(net.stage_macs) == 11 and len(net.head_macs) == 10


# Cost percent of the exits of EENet-110 in the paper's Table 7, for the four rules it reports.
TABLE_7 = {
    "fine": [6, 11, 15, 19, 23, 27, 30, 34, 37, 41],
    "pareto": [21, 37, 50, 60, 69, 74, 80, 83, 87, 91],
    "golden_ratio": [2, 4, 6, 8, 10, 11, 15, 25, 39, 63],
    "linear": [10, 19, 28, 37, 47, 56, 65, 74, 83, 93],
}


def test_placement_on_resnet110_matches_table_7():
    prof = earlyexit.profile(timm.create_model("resnet110"))
    fractions = [c.fraction for c in prof.candidates]
    for dist, paper in TABLE_7.items():
        picks = place_exits(fractions, earlyexit.distribution_targets(dist, 10))
        ours = [100 * fractions[k] for k in picks]
        # One residual block of resnet110 is 1.85% of its cost: we must land on the same block.
        assert all(abs(a - b) < 1.5 for a, b in zip(ours, paper)), (dist, ours, paper)


@pytest.mark.parametrize(
    ("name", "size"),
    [("resnet20", None), ("vit_tiny_patch16_224", None), ("convnext_atto", (3, 64, 64))],
)
def test_conv_head_is_counted_in_the_costs_and_sees_the_certainty(name, size):
    # NCHW features get a strided conv, tokens and NHWC features a LayerNorm + Linear.
    model = timm.create_model(name, num_classes=10)
    pool = earlyexit.convert(model, n_exits=2, exit_type="pool", input_size=size)
    conv = earlyexit.convert(model, n_exits=2, exit_type="conv", input_size=size)
    assert conv.exit_names == pool.exit_names
    assert all(c > p for c, p in zip(conv.head_macs, pool.head_macs))
    torch.testing.assert_close(
        conv.exit_costs[-1] - pool.exit_costs[-1],
        torch.tensor((sum(conv.head_macs) - sum(pool.head_macs)) / conv.backbone_macs),
    )
    for head in conv.heads:
        assert head.confidence.in_features == head.classifier.in_features + 3
    out = conv.train()(torch.randn(2, *conv.input_size))
    # The confidence's certainty inputs are detached: it never trains the classifier.
    (grad,) = torch.autograd.grad(
        out.confidence_logits[0].sum(), conv.heads[0].classifier.weight, allow_unused=True
    )
    assert grad is None


def test_conv_confidence_starts_as_max_softmax_at_the_default_precision():
    assert earlyexit.heads.CONFIDENCE_PRIOR == earlyexit.loss.DEFAULT_EXIT_PRECISION
    torch.manual_seed(0)
    logits = torch.randn(64, 10) * 4
    logits[0] = torch.tensor([25.0] + [0.0] * 9)  # p rounds to 1 in float32; logit p need not
    log_p, margin, logit_p = earlyexit.heads.certainty(logits).unbind(1)
    p = logits.double().softmax(1).amax(1)
    torch.testing.assert_close(log_p.double(), p.log(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        logit_p.double(), torch.logit(p).clamp(-30, 30), rtol=1e-4, atol=1e-4
    )
    assert logit_p[0].item() == pytest.approx(25 - math.log(9), rel=1e-5)
    assert log_p[0].item() == pytest.approx(-9 * math.exp(-25), rel=1e-5)  # not 0
    top2 = logits.topk(2, dim=1).values
    torch.testing.assert_close(margin, top2[:, 0] - top2[:, 1])
    # One class: p = 1, logit p clamped rather than inf.
    assert earlyexit.heads.certainty(torch.zeros(3, 1))[:, 2].eq(30).all()

    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
    x = torch.randn(64, *net.input_size)
    with torch.no_grad():
        out = net.forward_all(x)
    for z, a in zip(out.logits[:-1], out.confidence_logits):
        top = z.softmax(1).amax(1)
        # Untrained: sigmoid(a + logit q) is the top probability, so h >= 0.5 <=> p >= q.
        torch.testing.assert_close(torch.sigmoid(a + math.log(0.95 / 0.05)), top, atol=1e-5, rtol=0)
        assert torch.equal(torch.sigmoid(a) >= 0.5, top >= 0.95) or (top - 0.95).abs().min() < 1e-5


@pytest.mark.parametrize("scale", [0.0, 0.3])
def test_grad_scale_scales_what_the_heads_send_into_the_backbone(scale):
    model = timm.create_model("resnet20")
    with torch.no_grad():  # the last BN of each block starts at zero, which blocks gradients
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(4, 3, 32, 32)
    grads = {}
    for s in (1.0, scale):
        torch.manual_seed(0)  # the same heads
        net = earlyexit.convert(model, n_exits=2, exit_type="pool", grad_scale=s).train()
        net.zero_grad()
        out = net(x)
        # Only the heads' outputs: every backbone gradient comes through a head.
        heads_only = sum(z.square().mean() for z in out.logits[:-1])
        (heads_only + sum(a.sum() for a in out.confidence_logits)).backward()
        grads[s] = (
            [p.grad.clone() for p in model.parameters() if p.grad is not None],
            [p.grad.clone() for p in net.heads.parameters()],  # every one of them used
        )
    for full, scaled in zip(grads[1.0][0], grads[scale][0]):
        torch.testing.assert_close(scaled, scale * full, rtol=1e-4, atol=1e-6)
    for full, scaled in zip(grads[1.0][1], grads[scale][1]):  # the heads learn in full
        torch.testing.assert_close(scaled, full)
    assert earlyexit.convert(model, n_exits=2).config.grad_scale == 0.1  # conv's default
    assert earlyexit.convert(model, n_exits=2, exit_type="pool").config.grad_scale == 1.0
    with pytest.raises(ValueError, match=r"Expected `grad_scale` to be a float in \[0, 1\]"):
        earlyexit.convert(model, n_exits=2, grad_scale=1.5)


def test_conv_head_width():
    from earlyexit.heads import conv_width, pool_window

    assert [conv_width(c) for c in (4, 16, 32, 64, 256, 2048)] == [32, 32, 32, 32, 64, 512]
    # Pool windows tile the map exactly (PyTorch and ONNX average the same way), grid ≤ 4.
    for size in range(1, 120):
        window = pool_window(size)
        assert size % window == 0 and size // window <= 4
        assert all(size % k or size // k > 4 for k in range(1, window))


def test_backward_reaches_every_parameter():
    model = timm.create_model("resnet20")
    with torch.no_grad():  # the last BN of each block starts at zero, which blocks gradients
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    net = earlyexit.convert(model, n_exits=3, exit_type="bnpool").train()
    out = net(torch.randn(4, 3, 32, 32))
    loss = sum(z.square().mean() for z in out.logits) + sum(a.mean() for a in out.confidence_logits)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_train_mode_graph_keeps_stochastic_depth():
    model = timm.create_model("resnet20", drop_rate=0.3)
    toy = ToyNet()
    for m in (model, toy):
        size = None if m is model else (3, 16, 16)
        net = earlyexit.convert(m, n_exits=2, input_size=size).train()
        x = torch.randn(8, *net.input_size)
        torch.manual_seed(1)
        ref = m(x)
        torch.manual_seed(1)
        got = net(x).logits[-1]
        torch.testing.assert_close(got, ref)
        torch.manual_seed(2)
        assert not torch.allclose(net(x).logits[-1], ref), "dropout must stay on in train mode"


def test_convert_leaves_the_model_unchanged():
    model = timm.create_model("resnet20").train()
    model.layer2.eval()
    before = _state(model)
    flags = {n: m.training for n, m in model.named_modules()}
    net = earlyexit.convert(model, n_exits=3)
    assert net.training
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: m.training for n, m in model.named_modules()}
    assert net.backbone is model
    assert {id(p) for p in model.parameters()} <= {id(p) for p in net.parameters()}


def test_channels_last_autocast_and_dtype_moves():
    model = timm.create_model("resnet20").eval()
    net = earlyexit.convert(model, n_exits=2).eval()
    x = torch.randn(16, 3, 32, 32)
    _spread_confidences(net, x)
    with torch.no_grad():
        ref = net.early_exit(x)
        cl = net.early_exit(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = net.early_exit(x)
        net64 = copy.deepcopy(net).double()
        r64 = net64.early_exit(x.double())
    torch.testing.assert_close(cl.logits, ref.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(cl.exit_index, ref.exit_index)
    assert amp.logits.shape == ref.logits.shape and amp.logits.dtype == torch.bfloat16
    assert r64.logits.dtype == torch.float64
    assert net64.exit_costs.dtype == torch.float64


def test_compile_compiles_every_stage_and_head_and_matches_eager():
    net = earlyexit.convert(ToyNet(), n_exits=2, input_size=(3, 16, 16)).eval()
    x = torch.randn(32, 3, 16, 16)
    _spread_confidences(net, x)
    batches = (x, x[:5], x[:1])
    with torch.no_grad():
        eager = [net.early_exit(b) for b in batches]
    graphs = []

    def backend(gm, example_inputs):  # records each captured graph, runs it as it is
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    assert net.compile(backend=backend) is net
    with torch.no_grad():
        compiled = [net.early_exit(b) for b in batches]
        full = net.forward_all(x)
    # Every stage (one output) and every head (class and confidence logits) was captured.
    outputs = [len(next(n for n in g.graph.nodes if n.op == "output").args[0]) for g in graphs]
    assert outputs.count(2) >= net.num_exits
    assert outputs.count(1) >= len(net.stages())
    for out, ref in zip(compiled, eager, strict=True):
        assert torch.equal(out.exit_index, ref.exit_index)
        torch.testing.assert_close(out.logits, ref.logits)
    assert len(full.logits) == net.num_exits + 1
    torch._dynamo.reset()


def test_compaction_keeps_the_memory_layout():
    index = torch.tensor([4, 0, 2])
    for x in (torch.randn(5, 3, 4, 6), torch.randn(5, 3, 4, 6).to(memory_format=CL)):
        out = _select(x, index)
        assert torch.equal(out, x[index])
        layout = CL if x.is_contiguous(memory_format=CL) else torch.contiguous_format
        assert out.is_contiguous(memory_format=layout)


@pytest.mark.gpu
def test_cuda_matches_cpu(monkeypatch):
    # TF32 (cuDNN's default for convolutions) rounds to about 1e-3: more than the tolerance.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
    x = torch.randn(32, 3, 32, 32)
    _spread_confidences(net, x)
    with torch.no_grad():
        cpu = net.early_exit(x)
        net.cuda()
        gpu = net.early_exit(x.cuda())
    assert torch.equal(gpu.exit_index.cpu(), cpu.exit_index)
    torch.testing.assert_close(gpu.logits.cpu(), cpu.logits, rtol=1e-3, atol=1e-3)


def test_config_round_trip_and_forced_exit_names():
    model = timm.create_model("resnet20")
    net = earlyexit.convert(model, n_exits=3, dist="fine")
    config = earlyexit.EarlyExitConfig.from_dict(net.config.to_dict())
    assert config == net.config
    again = earlyexit.convert(model, config)
    assert again.exit_names == net.exit_names
    torch.testing.assert_close(again.exit_costs, net.exit_costs)
    forced = earlyexit.EarlyExitConfig(n_exits=2, exit_names=["layer2.0", "layer3.0"])
    assert earlyexit.convert(model, forced).exit_names == ["layer2.0", "layer3.0"]


def test_exit_names_accept_every_alias():
    # `layer1` is the output of its last block, `layer1.2`, which its ReLU closes.
    model = timm.create_model("resnet20")
    for names in (["layer1", "layer2"], ["layer1.2.act2", "layer2.2"], ["layer1.2", "layer2"]):
        config = earlyexit.EarlyExitConfig(n_exits=2, exit_names=names)
        assert earlyexit.convert(model, config).exit_names == ["layer1.2", "layer2.2"]
        net = earlyexit.convert(model, 2, exit_names=names)
        assert net.exit_names == ["layer1.2", "layer2.2"] == net.config.exit_names
    assert names == ["layer1.2", "layer2"]  # the caller's list is left alone
    prof = earlyexit.profile(model)
    assert prof.candidates[prof.names().index("layer1.2")].aliases == ("layer1.2.act2", "layer1")


@pytest.mark.parametrize(
    ("exit_names", "error", "match"),
    [
        (
            ["layer1", "layer9"],
            earlyexit.PlacementError,
            r"no candidate exit point named \['layer9'\]",
        ),
        (["layer1", "layer1.2"], earlyexit.PlacementError, "twice"),
        (["layer2", "layer1"], earlyexit.PlacementError, "execution order"),
        (["layer1.0.conv1", "layer2"], earlyexit.PlacementError, "layer1.0.conv1"),
        ("layer1", ValueError, "Expected `exit_names` to be 1 node names"),
    ],
)
def test_bad_exit_names(exit_names, error, match):
    n_exits = 1 if isinstance(exit_names, str) else 2
    with pytest.raises(error, match=match):
        earlyexit.convert(timm.create_model("resnet20"), n_exits, exit_names=exit_names)


@pytest.mark.parametrize(
    ("make", "size"),
    [
        (lambda: timm.create_model("resnet20"), None),
        (lambda: timm.create_model("convnext_atto"), (3, 64, 64)),
        (lambda: timm.create_model("vit_tiny_patch16_224", img_size=64), (3, 64, 64)),
        (lambda: torchvision.models.mobilenet_v3_small(), (3, 64, 64)),
    ],
    ids=["resnet20", "convnext_atto", "vit_tiny", "mobilenet_v3_small"],
)
def test_exit_names_are_the_innermost_modules(make, size):
    model = make()
    modules = dict(model.named_modules())
    prof = earlyexit.profile(model, size)
    for c in prof.candidates:
        outputs = [n for n in (c.name, *c.aliases) if n in modules]
        if outputs:
            # The name is a module, and the innermost one: its aliases are modules around it,
            # or the layer that closes it.
            assert model.get_submodule(c.name) is modules[c.name], c
            assert all(
                a.startswith(c.name + ".") or c.name.startswith(a + ".") for a in outputs[1:]
            ), c
    net = earlyexit.convert(model, n_exits=3, input_size=size, exit_type="pool")
    for name in net.exit_names:
        assert net.backbone.get_submodule(name) is modules[name]


def test_threshold_setter_and_validation():
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2)
    net.threshold = 0.7
    assert net.threshold == 0.7 and net.config.threshold == 0.7
    for bad, err in [(math.nan, ValueError), ("0.5", TypeError), (-0.1, ValueError)]:
        with pytest.raises(err, match="threshold"):
            net.threshold = bad
        with pytest.raises(err, match="threshold"):
            net.early_exit(torch.randn(1, 3, 32, 32), threshold=bad)
    assert net.threshold == 0.7


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"n_exits": 0}, ValueError, "positive int"),
        ({"n_exits": 2.5}, ValueError, "positive int"),
        ({"n_exits": 500}, earlyexit.PlacementError, "candidate exit points"),
        ({"n_exits": 2, "dist": "cubic"}, ValueError, "pareto, golden_ratio"),
        ({"n_exits": 2, "exit_type": "mlp"}, ValueError, "plain, pool, bnpool, conv"),
        ({"n_exits": 2, "input_size": (32, 32)}, ValueError, "three positive ints"),
        ({"n_exits": 2, "input_size": (1, 32, 32)}, earlyexit.TraceError, "input_size"),
        ({"n_exits": 2, "threshold": math.nan}, ValueError, "threshold"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_alone(kwargs, error, match):
    model = timm.create_model("resnet20")
    before = _state(model)
    with pytest.raises(error, match=match):
        earlyexit.convert(model, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_models_that_cannot_be_converted():
    with pytest.raises(earlyexit.TraceError, match="not a classifier"):
        earlyexit.convert(FeatureNet(), n_exits=1, input_size=(3, 8, 8))
    with pytest.raises(earlyexit.TraceError, match="Hint"):
        earlyexit.convert(BranchyNet(), n_exits=1, input_size=(3, 8, 8))
    with pytest.raises(ValueError, match="input_size"):
        earlyexit.convert(ToyNet(), n_exits=1)
    with pytest.raises(TypeError, match=r"nn\.Module"):
        earlyexit.convert("resnet20", n_exits=1)


@given(n=st.integers(1, 40), dist=st.sampled_from([*DISTRIBUTIONS, "gold_ratio", "golden"]))
def test_distribution_targets_increase_inside_the_unit_interval(n, dist):
    targets = earlyexit.distribution_targets(dist, n)
    assert len(targets) == n
    assert all(0 < t < 1 for t in targets)
    assert all(a < b for a, b in zip(targets, targets[1:]))


def test_distribution_targets_formulas():
    phi = (1 + 5**0.5) / 2
    n = 4
    expected = {
        "pareto": [1 - 0.8 ** (i + 1) for i in range(n)],
        "fine": [1 - 0.95 ** (i + 1) for i in range(n)],
        "golden_ratio": [phi ** (i - n) for i in range(n)],
        "linear": [(i + 1) / (n + 1) for i in range(n)],
        "quadratic": [((i + 1) / (n + 1)) ** 2 for i in range(n)],
    }
    for dist, values in expected.items():
        assert earlyexit.distribution_targets(dist, n) == pytest.approx(values)


@settings(max_examples=200)
@given(
    fractions=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=30).map(sorted),
    targets=st.lists(st.floats(0.001, 0.999), min_size=1, max_size=8, unique=True).map(sorted),
)
def test_each_exit_takes_the_first_unused_candidate_reaching_its_target(fractions, targets):
    try:
        picks = place_exits(fractions, targets)
    except earlyexit.PlacementError:
        return
    previous = -1
    for target, pick in zip(targets, picks):
        assert pick > previous and fractions[pick] >= target
        assert all(fractions[k] < target for k in range(previous + 1, pick))
        previous = pick


def test_profile_lists_candidates_in_order():
    prof = earlyexit.profile(timm.create_model("resnet20"))
    assert prof.input_size == (3, 32, 32) and prof.num_classes == 10
    fractions = [c.fraction for c in prof.candidates]
    assert all(a < b for a, b in zip(fractions, fractions[1:]))
    assert prof.candidates[-1].fraction <= 1.0
    assert "layer1.0" in prof.names() and "layer3.2" in prof.names()
    assert all(c.shape[0] in (16, 32, 64) and c.channel_axis == 1 for c in prof.candidates)


def test_stage_macs_sum_to_fvcore_total():
    from fvcore.nn import FlopCountAnalysis

    model = timm.create_model("resnet20").eval()
    total = FlopCountAnalysis(model, torch.zeros(1, 3, 32, 32))
    total.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    net = earlyexit.convert(model, n_exits=4)
    assert sum(net.stage_macs) == pytest.approx(total.total(), rel=5e-3)


def test_cli_profile(capsys):
    from earlyexit.cli import main

    assert main(["profile", "resnet20", "--n-exits", "3"]) == 0
    out = capsys.readouterr().out
    assert "layer1.0" in out
    for dist in DISTRIBUTIONS:
        assert dist in out


@pytest.mark.parametrize(
    ("x", "error", "match"),
    [
        ([[0.0]], TypeError, "to be a tensor"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.uint8), TypeError, r"x\.float\(\) / 255"),
        (torch.zeros(3, 32, 32), ValueError, r"unsqueeze\(0\)"),
        (torch.zeros(2, 1, 32, 32), ValueError, r"\(B, 3, 32, 32\)"),
        (torch.zeros(2, 3, 32, 32, dtype=torch.float64), TypeError, "torch.float32"),
        (torch.zeros(2, 3, 32, 32, device="meta"), ValueError, "net's device, cpu"),
    ],
)
def test_early_exit_names_bad_inputs(x, error, match):
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2).eval()
    with pytest.raises(error, match=match):
        net.early_exit(x)
    with pytest.raises(error, match=match):
        net(x)  # eval-mode forward is early exit
    other_size = torch.zeros(2, 3, 40, 40)  # a convolutional net takes other sizes
    assert net.early_exit(other_size).logits.shape == (2, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the net casts for itself
        assert net.early_exit(torch.zeros(2, 3, 32, 32, dtype=torch.bfloat16)).logits.shape[0] == 2


def test_conv_head_keeps_a_two_by_two_layout():
    from earlyexit.heads import LAYOUT_GRID, ExitHead

    assert LAYOUT_GRID == 2
    # Maps pooled to 4×4 or 2×2 keep 2×2 cells; to 1×1 (7×7 maps), one.
    cells = {n: ExitHead("conv", (16, n, n), 1, 10).cells for n in (32, 28, 16, 14, 8, 7, 4, 1)}
    assert cells == {32: 4, 28: 4, 16: 4, 14: 4, 8: 4, 7: 1, 4: 4, 1: 1}
    torch.manual_seed(0)
    kept = ExitHead("conv", (16, 28, 28), 1, 10)
    assert kept.classifier.in_features == 4 * 32 and kept.confidence.in_features == 4 * 32 + 3
    one = ExitHead("conv", (16, 28, 28), 1, 10, layout=1)
    assert one.cells == 1 and one.classifier.in_features == 32
    # A layout head whose weights are the same on every cell (÷ 4) is the one-cell head: it
    # only adds what a global mean threw away.
    with torch.no_grad():
        one.conv.load_state_dict(kept.conv.state_dict(), strict=False)
        for name in ("classifier", "confidence"):
            a, b = getattr(one, name), getattr(kept, name)
            w = a.weight[:, :32].repeat_interleave(4, dim=1) / 4
            b.weight.copy_(torch.cat((w, a.weight[:, 32:]), dim=1))
            b.bias.copy_(a.bias)
    x = torch.randn(5, 16, 28, 28)
    for got, want in zip(kept.eval()(x), one.eval()(x)):
        torch.testing.assert_close(got, want)
    # Tokens and channels-last features keep their global mean.
    assert ExitHead("conv", (49, 64), 2, 10).cells == 1
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="Expected `layout` to be a positive int"):
            ExitHead("conv", (16, 28, 28), 1, 10, layout=bad)
