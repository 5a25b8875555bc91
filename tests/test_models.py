"""The paper's backbones: registered in timm, the right size, and well-behaved timm models."""

from __future__ import annotations

import doctest
import functools
import subprocess
import sys
import textwrap
import warnings

import pytest
import timm
import torch
import torch.fx
from timm.data import resolve_data_config
from torch import nn

import earlyexit
import earlyexit.models.cifar_resnet
import earlyexit.models.mnist_resnet
from earlyexit.models import CifarResNet, ZeroPadShortcut
from earlyexit.models._builder import register

pytestmark = pytest.mark.timeout(60)

CIFAR_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet1202"]
ALL_NAMES = ["resnet8", *CIFAR_NAMES]
# Everything but resnet1202 (19M parameters, 2.8 GMACs), for tests that run a model more than once.
SMALL_NAMES = [name for name in ALL_NAMES if name != "resnet1202"]

# He et al. 2016, Table 6 (option A shortcuts): parameters in millions, two significant digits.
HE_PARAMS_M = {
    "resnet20": 0.27,
    "resnet32": 0.46,
    "resnet44": 0.66,
    "resnet56": 0.85,
    "resnet110": 1.7,
    "resnet1202": 19.4,
}
EXACT_PARAMS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
    "resnet1202": 19_421_274,
}
# The EENets paper, Table 6: MMACs per 32×32 sample.
EENET_MMACS = {"resnet20": 41.41, "resnet32": 70.06, "resnet44": 98.72, "resnet110": 256.32}
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def fvcore_macs(model: nn.Module, x: torch.Tensor) -> int:
    """fvcore's own count (one multiply-add = one 'flop'), quietly, in eval mode."""
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, x)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return int(analysis.total())


def relu_elements(model: nn.Module, x: torch.Tensor) -> int:
    """Elements out of every ReLU call: what ptflops counts and fvcore does not."""
    count = 0

    def hook(module: nn.Module, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal count
        count += output.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return count


@functools.cache
def shared_model(name: str, **kwargs) -> nn.Module:
    """One eval-mode instance per (name, kwargs), for tests that neither train nor modify it."""
    return timm.create_model(name, **kwargs).eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def sample(model: nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, *model.pretrained_cfg["input_size"])


# --- registration ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_timm_finds_our_models(name):
    assert timm.is_model(name)
    assert name in timm.list_models()
    assert timm.models.model_entrypoint(name).__module__.startswith("earlyexit.")


def test_register_replaces_our_own_name_silently():
    """Registering one of ours again (as reloading its module does) is quiet and ours stays."""
    original = earlyexit.models.cifar_resnet.resnet20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert register(original) is original
    assert timm.models.model_entrypoint("resnet20") is original
    assert timm.create_model("resnet20").pretrained_cfg["input_size"] == (3, 32, 32)


def test_import_keeps_a_model_that_already_has_the_name():
    """A `resnet20` registered by someone else before `import earlyexit` stays, with a warning."""
    script = textwrap.dedent(
        """
        import warnings

        import timm
        from timm.models import register_model
        from torch import nn


        class Dummy(nn.Module):
            def forward(self, x):
                return x


        @register_model
        def resnet20(pretrained=False, **kwargs):
            return Dummy()


        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import earlyexit
        found = [
            str(w.message) for w in caught if issubclass(w.category, earlyexit.EarlyExitWarning)
        ]
        assert len(found) == 1 and "resnet20" in found[0] and "Hint:" in found[0], found
        others = [w for w in caught if not issubclass(w.category, earlyexit.EarlyExitWarning)]
        assert not others, [str(w.message) for w in others]
        assert timm.models.model_entrypoint("resnet20") is resnet20
        assert type(timm.create_model("resnet20")) is Dummy
        assert type(timm.create_model("resnet32")).__name__ == "CifarResNet"
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_import_is_silent():
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import earlyexit"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# --- size -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_parameter_counts_match_he_et_al(name):
    count = n_params(shared_model(name))
    assert count == EXACT_PARAMS[name]
    expected = HE_PARAMS_M[name]
    digits = 1 if expected >= 1 else 2
    assert round(count / 1e6, digits) == expected


@pytest.mark.parametrize("name", ["resnet20", "resnet110"])
def test_zero_pad_shortcuts_have_no_parameters(name):
    model = shared_model(name)
    projection = shared_model(name, shortcut="projection")
    shortcuts = [m for m in model.modules() if isinstance(m, ZeroPadShortcut)]
    assert len(shortcuts) == 2
    # Option B adds two strided 1×1 convs (16→32, 32→64) and their BatchNorms.
    assert n_params(projection) - n_params(model) == 16 * 32 + 32 * 64 + 2 * (32 + 64)


@pytest.mark.parametrize("name", list(EENET_MMACS))
def test_fvcore_macs_within_two_percent_of_the_paper(name):
    macs = earlyexit.profile(shared_model(name)).total_macs
    assert macs == pytest.approx(EENET_MMACS[name] * 1e6, rel=0.02)


@pytest.mark.parametrize("name", list(EENET_MMACS))
def test_paper_macs_are_ptflops_on_projection_shortcuts(name):
    # The paper's counter (ptflops) counts what fvcore does (conv, eval BatchNorm as 2 per
    # element, pooling, linear) plus one per ReLU output; its ResNets use option B shortcuts.
    model = shared_model(name, shortcut="projection")
    x = torch.zeros(1, 3, 32, 32)
    macs = fvcore_macs(model, x) + relu_elements(model, x)
    assert round(macs / 1e6, 2) == EENET_MMACS[name]


@pytest.mark.parametrize(("width", "params", "macs"), [(4, 5_142, 639_120), (2, 1_384, 175_304)])
def test_resnet8_size(width, params, macs):
    model = shared_model("resnet8", width=width)
    assert n_params(model) == params
    assert earlyexit.profile(model).total_macs == macs


@pytest.mark.parametrize("name", ["resnet8", "resnet20"])
def test_profile_counts_what_fvcore_counts(name):
    model = shared_model(name)
    x = torch.zeros(1, *model.pretrained_cfg["input_size"])
    assert earlyexit.profile(model).total_macs == fvcore_macs(model, x)


# --- the timm model interface ---------------------------------------------------------------


@pytest.mark.parametrize("name", SMALL_NAMES)
def test_default_output_shape_and_cfg(name):
    model = shared_model(name)
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == model.num_classes == 10
    assert model(sample(model)).shape == (2, 10)
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg["first_conv"]], nn.Conv2d)
    assert modules[cfg["classifier"]] is model.get_classifier()
    assert model.get_classifier(name_only=True) == "fc"
    assert {"conv1", "layer1.0", "layer1.0.conv1", "layer3", "fc"} <= set(modules)


@pytest.mark.parametrize(
    ("name", "input_size", "mean", "std"),
    [
        ("resnet20", (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD),
        ("resnet110", (3, 32, 32), CIFAR10_MEAN, CIFAR10_STD),
        ("resnet8", (1, 28, 28), (0.1307,), (0.3081,)),
    ],
)
def test_resolve_data_config(name, input_size, mean, std):
    config = resolve_data_config({}, model=shared_model(name))
    assert config["input_size"] == input_size
    assert config["mean"] == pytest.approx(mean)
    assert config["std"] == pytest.approx(std)
    assert config["crop_pct"] == 1.0


@pytest.mark.parametrize("name", ["resnet8", "resnet20"])
def test_constructor_options(name):
    base = shared_model(name)
    size = base.pretrained_cfg["input_size"][1:]
    width = base.num_features

    model = timm.create_model(name, num_classes=7, in_chans=5).eval()
    assert model.in_chans == 5
    assert model(torch.randn(2, 5, *size)).shape == (2, 7)

    model = timm.create_model(name, num_classes=0).eval()
    assert model(sample(model)).shape == (2, width)

    model = timm.create_model(name, global_pool="catavgmax").eval()
    assert model.head_hidden_size == 2 * width
    assert model(sample(model)).shape == (2, 10)

    model = timm.create_model(name, num_classes=0, global_pool="").eval()
    assert model(sample(model)).shape[:2] == (2, width)
    assert model(sample(model)).ndim == 4


@pytest.mark.parametrize("name", ["resnet8", "resnet20"])
def test_drop_rate(name):
    model = timm.create_model(name, drop_rate=0.5)
    x = sample(model)
    features = model.forward_features(x)
    train = model.train().forward_head(features, pre_logits=True)
    assert (train == 0).float().mean() > 0.2
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    torch.testing.assert_close(
        model.forward_head(features, pre_logits=True), features.mean(dim=(2, 3))
    )


@pytest.mark.parametrize("name", ["resnet8", "resnet20"])
def test_reset_classifier(name):
    model = timm.create_model(name).double().eval()
    x = sample(model).double()
    features = model.forward_features(x)

    model.reset_classifier(3)
    assert model.num_classes == 3
    assert model(x).shape == (2, 3)
    assert model.fc.weight.dtype == torch.float64
    assert not model.fc.training
    torch.testing.assert_close(model.forward_features(x), features)

    model.reset_classifier(0, global_pool="avgmax")
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, model.num_features)


@pytest.mark.parametrize(
    ("name", "channels", "reductions"),
    [
        ("resnet20", [16, 16, 32, 64], [1, 1, 2, 4]),
        ("resnet1202", [16, 16, 32, 64], [1, 1, 2, 4]),
        ("resnet8", [4, 4, 8, 16], [1, 1, 2, 4]),
    ],
)
def test_features_only(name, channels, reductions):
    features = shared_model(name, features_only=True)
    assert features.feature_info.channels() == channels
    assert features.feature_info.reduction() == reductions
    if name == "resnet1202":
        return  # building and describing it is enough
    x = sample(features)
    outputs = features(x)
    assert [o.shape[1] for o in outputs] == channels
    assert [x.shape[-1] // o.shape[-1] for o in outputs] == reductions

    last = timm.create_model(name, features_only=True, out_indices=(3,)).eval()
    last.load_state_dict(features.state_dict())
    torch.testing.assert_close(last(x)[0], outputs[-1])


def test_last_feature_map_is_forward_features():
    model = timm.create_model("resnet20").eval()
    features = timm.create_model("resnet20", features_only=True).eval()
    features.load_state_dict(model.state_dict(), strict=False)
    x = sample(model)
    torch.testing.assert_close(features(x)[-1], model.forward_features(x))


# --- tracing --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_fx_trace_matches_the_model(name):
    # Untrained and He-initialised, a deep CIFAR ResNet blows up in eval mode (its BatchNorm
    # statistics are not trained yet); blocks that start as their shortcut keep it finite.
    model = shared_model(name, zero_init_last=True)
    traced = torch.fx.symbolic_trace(model)
    x = sample(model, batch=1 if name == "resnet1202" else 2)
    with torch.no_grad():
        expected = model(x)
        assert expected.isfinite().all()
        torch.testing.assert_close(traced(x), expected)


def test_fx_trace_in_train_mode():
    model = timm.create_model("resnet20").train()
    traced = torch.fx.symbolic_trace(model)
    x = sample(model)
    torch.testing.assert_close(traced(x), model(x))


def test_zero_pad_shortcut():
    shortcut = ZeroPadShortcut(3, 8, stride=2)
    x = torch.randn(2, 3, 7, 7)
    out = shortcut(x)
    assert out.shape == (2, 8, 4, 4)
    torch.testing.assert_close(out[:, :3], x[:, :, ::2, ::2])
    assert not out[:, 3:].any()
    traced = torch.fx.symbolic_trace(shortcut)
    torch.testing.assert_close(traced(x), out)


@pytest.mark.parametrize("size", [31, 33, 40])
def test_odd_input_sizes(size):
    model = shared_model("resnet20")
    assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


# --- initialisation -------------------------------------------------------------------------


def test_blocks_start_as_their_shortcut_with_zero_init_last():
    model = shared_model("resnet110", zero_init_last=True)
    blocks = [m for m in model.modules() if isinstance(m, earlyexit.models.BasicBlock)]
    assert len(blocks) == 54
    assert all(not block.bn2.weight.any() for block in blocks)
    # A fresh deep model stays numerically sane in eval mode.
    assert model(sample(model)).abs().max() < 100


def test_he_init_by_default():
    model = timm.create_model("resnet20")
    assert all(m.weight.eq(1).all() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    resnet8 = timm.create_model("resnet8", zero_init_last=True)
    assert not resnet8.layer3[0].conv2.weight.any()


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_pretrained_raises(name):
    with pytest.raises(ValueError, match=rf"`{name}`.*pretrained=True.*Hint:"):
        timm.create_model(name, pretrained=True)


def test_pretrained_loads_your_own_weights(tmp_path):
    source = timm.create_model("resnet8", width=2)
    path = tmp_path / "resnet8.pth"
    torch.save(source.state_dict(), path)
    model = timm.create_model(
        "resnet8", width=2, pretrained=True, pretrained_cfg_overlay={"file": str(path)}
    )
    torch.testing.assert_close(model.state_dict(), source.state_dict())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"depth": 21}, "Expected `depth` to be 6n\\+2"),
        ({"depth": 2}, "Expected `depth` to be 6n\\+2"),
        ({"widths": (16, 32)}, "Expected `widths`"),
        ({"shortcut": "C"}, "Expected `shortcut`"),
    ],
)
def test_bad_cifar_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CifarResNet(**kwargs)


@pytest.mark.parametrize("width", [0, -1, 2.0, True])
def test_bad_resnet8_width(width):
    with pytest.raises(ValueError, match="Expected `width` to be a positive int"):
        timm.create_model("resnet8", width=width)


def test_zero_pad_shortcut_rejects_shrinking():
    with pytest.raises(ValueError, match="Expected `out_chs` >= `in_chs`"):
        ZeroPadShortcut(8, 4)


@pytest.mark.parametrize(
    "module",
    [earlyexit.models.cifar_resnet, earlyexit.models.mnist_resnet],
    ids=lambda m: m.__name__,
)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0
    assert result.failed == 0
