"""Saving and loading: one safetensors file, no pickle, no re-profiling, clear failures."""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from unittest import mock

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import earlyexit
from earlyexit.errors import CheckpointError
from earlyexit.io import FORMAT_VERSION, METADATA_KEY, _digest, load, read_metadata, save

from toy_models import spread_confidences


class ToyNet(nn.Module):
    """A classifier that timm does not know."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def net() -> earlyexit.EarlyExitNet:
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=3)
    spread_confidences(net, torch.randn(32, 3, 32, 32))
    net.threshold = 0.6
    return net.eval()


@pytest.fixture(scope="module")
def saved(net, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("io") / "eenet20.safetensors")
    save(net, path)
    return path


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def assert_same_inference(a: earlyexit.EarlyExitNet, b: earlyexit.EarlyExitNet, x) -> None:
    ra, rb = a.early_exit(x), b.early_exit(x)
    torch.testing.assert_close(rb.logits, ra.logits, rtol=0, atol=0)
    torch.testing.assert_close(rb.exit_index, ra.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(rb.cost, ra.cost, rtol=0, atol=0)


def test_round_trip_rebuilds_the_timm_net(net, saved, x):
    loaded = load(saved)
    assert not loaded.training
    assert loaded.exit_names == net.exit_names
    assert loaded.config == net.config
    assert loaded.threshold == 0.6
    assert loaded.stage_macs == net.stage_macs and loaded.head_macs == net.head_macs
    torch.testing.assert_close(loaded.exit_costs, net.exit_costs, rtol=0, atol=0)
    assert set(loaded.early_exit(x).exit_index.tolist()) == {0, 1, 2, 3}
    assert_same_inference(net, loaded, x)


def test_round_trip_test_resnet(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=7)
    net = earlyexit.convert(model, n_exits=2, dist="linear", input_size=(3, 48, 48)).eval()
    path = tmp_path / "test_resnet.safetensors"
    save(net, path)
    meta = read_metadata(path)
    assert meta["backbone"]["architecture"] == "test_resnet"
    assert meta["backbone"]["kwargs"] == {"num_classes": 7, "in_chans": 3}
    assert_same_inference(net, load(path), torch.randn(4, 3, 48, 48))


def test_files_with_the_names_of_earlier_versions_load(net, saved, tmp_path, x):
    # Earlier versions named a cut point by the outermost module whose output it is: the
    # output of resnet20's `layer1.2` was `layer1`. Such a file loads, under today's names.
    assert net.exit_names == ["layer1.1", "layer1.2", "layer2.1"]
    old_names = ["layer1.1", "layer1", "layer2.1"]
    meta = read_metadata(saved)
    old = tmp_path / "old_names.safetensors"
    _rewrite(
        saved,
        old,
        meta_update={
            "config": {**meta["config"], "exit_names": old_names},
            "exit_names": old_names,
        },
    )
    assert read_metadata(old)["config"]["exit_names"] == old_names
    for loaded in (load(old), load(old, backbone=timm.create_model("resnet20"))):
        assert loaded.exit_names == net.exit_names and loaded.config == net.config
        assert_same_inference(net, loaded, x)


def test_files_from_before_heads_kept_a_layout_load_unchanged(tmp_path, x):
    # Earlier conv heads averaged their whole map into one cell (layout 1); their files record
    # no layout. Such a file loads with layout 1 and computes what it computed.
    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    one_cell = functools.partial(earlyexit.heads.ExitHead, layout=1)
    with mock.patch.object(earlyexit.model, "ExitHead", one_cell):
        old_net = earlyexit.convert(model, n_exits=3)
    spread_confidences(old_net, torch.randn(32, 3, 32, 32))
    old_net.eval()
    assert [h.cells for h in old_net.heads] == [1, 1, 1]
    assert old_net.heads[0].classifier.in_features == 32
    path = tmp_path / "one_cell.safetensors"
    save(old_net, path)
    meta = read_metadata(path)
    assert [h["layout"] for h in meta["heads"]] == [1, 1, 1]
    old = tmp_path / "no_layout.safetensors"
    heads = [{k: v for k, v in h.items() if k != "layout"} for h in meta["heads"]]
    _rewrite(str(path), old, meta_update={"heads": heads})
    loaded = load(old)
    assert [h.layout for h in loaded.heads] == [1, 1, 1]
    assert_same_inference(old_net, loaded, x)
    # Today's default keeps 2×2 cells, and says so in the file.
    assert [h["layout"] for h in read_metadata(_saved_default(tmp_path))["heads"]] == [2, 2, 2]
    # A malformed layout is refused by name.
    heads[0]["layout"] = "wide"
    _rewrite(str(path), old, meta_update={"heads": heads})
    with pytest.raises(CheckpointError, match=r"heads recorded in .* are malformed.*`layout`"):
        load(old)


def _saved_default(tmp_path: Path) -> Path:
    path = tmp_path / "default.safetensors"
    save(earlyexit.convert(timm.create_model("resnet20", num_classes=10), n_exits=3), path)
    return path


def test_files_from_before_the_logit_p_input_load_unchanged(net, saved, tmp_path, x):
    # Earlier conv heads' confidence saw two certainty inputs (log p, margin), not three:
    # such a file loads with a weight of 0 on logit p, which computes what it computed.
    old_net = copy.deepcopy(net)
    tensors = load_file(saved)
    for k in range(net.num_exits):
        key = f"heads.{k}.confidence.weight"
        tensors[key] = tensors[key][:, :-1].contiguous()
        with torch.no_grad():
            old_net.heads[k].confidence.weight[:, -1] = 0.0
    old = tmp_path / "two_inputs.safetensors"
    _rewrite(saved, old, tensors=tensors, meta_update={"sha256": _digest(tensors)})
    loaded = load(old)
    assert all(float(h.confidence.weight[0, -1]) == 0.0 for h in loaded.heads)
    assert_same_inference(old_net, loaded, x)
    # Any other width is still refused, by name.
    tensors["heads.0.confidence.weight"] = tensors["heads.0.confidence.weight"][:, :-1].contiguous()
    _rewrite(saved, old, tensors=tensors, meta_update={"sha256": _digest(tensors)})
    with pytest.raises(
        CheckpointError, match=r"heads\.0\.confidence\.weight: file \(1, 129\) vs model \(1, 131\)"
    ):
        load(old)


def test_unknown_exit_name_is_refused(saved, tmp_path):
    meta = read_metadata(saved)
    names = ["layer1.1", "layer1.0.conv1", "layer2.1"]
    bad = tmp_path / "unknown.safetensors"
    _rewrite(saved, bad, meta_update={"config": {**meta["config"], "exit_names": names}})
    with pytest.raises(CheckpointError, match=r"no cut point named \['layer1.0.conv1'\].*Hint"):
        load(bad)


def test_load_does_not_profile(saved, monkeypatch):
    import earlyexit.flops

    def fail(*args, **kwargs):
        raise AssertionError("load must not count MACs")

    monkeypatch.setattr(earlyexit.flops, "_analysis", fail)
    assert load(saved).num_exits == 3


def test_metadata_describes_the_net(net, saved):
    meta = read_metadata(saved)
    assert meta["format_version"] == FORMAT_VERSION
    assert meta["library_version"] == earlyexit.__version__
    assert earlyexit.EarlyExitConfig.from_dict(meta["config"]) == net.config
    assert meta["backbone"]["architecture"] == "resnet20"
    assert meta["backbone"]["kwargs"] == {"num_classes": 10, "in_chans": 3}
    assert meta["input_size"] == [3, 32, 32]
    assert meta["exit_names"] == net.exit_names
    assert meta["exit_type"] == "conv"
    assert meta["stage_macs"] == net.stage_macs and meta["head_macs"] == net.head_macs
    assert meta["exit_costs"] == pytest.approx(net.exit_costs.tolist())
    assert meta["threshold"] == 0.6
    assert meta["dtype"] == "float32"
    with safe_open(saved, framework="pt") as f:
        assert sorted(f.keys()) == sorted(net.state_dict())
        assert f.metadata()["format"] == "pt"


def test_load_into_a_given_backbone(net, saved, x):
    model = timm.create_model("resnet20", num_classes=10)
    loaded = load(saved, backbone=model)
    assert loaded.backbone is model
    torch.testing.assert_close(model.fc.weight, net.backbone.fc.weight, rtol=0, atol=0)
    assert_same_inference(net, loaded, x)


def test_non_timm_backbone_needs_to_be_given(tmp_path):
    torch.manual_seed(0)
    net = earlyexit.convert(ToyNet(), n_exits=1, input_size=(3, 16, 16)).eval()
    path = tmp_path / "toy.safetensors"
    save(net, path)
    assert read_metadata(path)["backbone"]["architecture"] is None
    with pytest.raises(CheckpointError, match="backbone=model"):
        load(path)
    assert_same_inference(net, load(path, backbone=ToyNet()), torch.randn(5, 3, 16, 16))


def test_tied_tensors_are_saved(tmp_path, x):
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
    assert net.heads[0].shape == net.heads[1].shape
    net.heads[1].classifier.weight = net.heads[0].classifier.weight
    path = tmp_path / "tied.safetensors"
    save(net, path)
    loaded = load(path)
    torch.testing.assert_close(
        loaded.heads[1].classifier.weight, net.heads[0].classifier.weight, rtol=0, atol=0
    )
    assert_same_inference(net, loaded, x)


def test_bfloat16_round_trip(tmp_path):
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2).eval()
    net.to(torch.bfloat16)
    path = tmp_path / "bf16.safetensors"
    save(net, path)
    loaded = load(path)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    for key, value in net.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_save_is_atomic(net, tmp_path, monkeypatch):
    import safetensors.torch

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"old content")

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save(net, path)
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert path.read_bytes() == b"old content"


def test_saved_file_is_not_private(net, tmp_path):
    path = tmp_path / "shared.safetensors"
    save(net, path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_rejects_other_modules(tmp_path):
    with pytest.raises(TypeError, match="EarlyExitNet"):
        save(nn.Linear(2, 2), tmp_path / "x.safetensors")


def _rewrite(src: str, dst, *, tensors=None, meta_update=None, drop_meta=False) -> None:
    with safe_open(src, framework="pt") as f:
        metadata = dict(f.metadata())
    state = load_file(src) if tensors is None else tensors
    doc = json.loads(metadata[METADATA_KEY])
    doc.update(meta_update or {})
    metadata[METADATA_KEY] = json.dumps(doc)
    if drop_meta:
        del metadata[METADATA_KEY]
    save_file(state, str(dst), metadata=metadata)


def test_missing_file():
    with pytest.raises(FileNotFoundError):
        load("/nonexistent/dir/model.safetensors")


@pytest.mark.parametrize(
    "damage",
    [
        "not_safetensors",
        "empty",
        "truncated",
        "truncated_header",
        "flipped_byte",
        "no_metadata",
        "bad_metadata",
        "newer_version",
        "missing_tensor",
        "extra_tensor",
    ],
)
def test_damaged_files_raise_checkpoint_error(saved, tmp_path, damage):
    bad = tmp_path / "bad.safetensors"
    data = Path(saved).read_bytes()
    if damage == "not_safetensors":
        bad.write_bytes(b"PK\x03\x04 this is a zip file, not a safetensors file" * 20)
    elif damage == "empty":
        bad.write_bytes(b"")
    elif damage == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif damage == "truncated_header":
        bad.write_bytes(data[:40])
    elif damage == "flipped_byte":
        corrupt = bytearray(data)
        corrupt[-123] ^= 0x40
        bad.write_bytes(bytes(corrupt))
    elif damage == "no_metadata":
        _rewrite(saved, bad, drop_meta=True)
    elif damage == "bad_metadata":
        _rewrite(saved, bad, meta_update={"config": {"n_exits": -1}, "sha256": None})
    elif damage == "newer_version":
        _rewrite(saved, bad, meta_update={"format_version": FORMAT_VERSION + 1})
    elif damage == "missing_tensor":
        state = load_file(saved)
        del state["heads.1.confidence.bias"]
        _rewrite(saved, bad, tensors=state, meta_update={"sha256": None})
    elif damage == "extra_tensor":
        state = load_file(saved)
        state["heads.9.weight"] = torch.zeros(2)
        _rewrite(saved, bad, tensors=state, meta_update={"sha256": None})
    with pytest.raises(CheckpointError, match="Hint"):
        load(bad)


@pytest.mark.parametrize(
    "make",
    [
        lambda: timm.create_model("resnet32", num_classes=10),
        lambda: timm.create_model("resnet20", num_classes=100),
        lambda: ToyNet(),
    ],
    ids=["deeper", "other_classes", "other_model"],
)
def test_wrong_backbone_is_refused_and_left_untouched(saved, make):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="Hint"):
        load(saved, backbone=model)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)


@pytest.mark.slow
def test_round_trip_in_a_fresh_process(net, saved, x, tmp_path):
    inputs = tmp_path / "inputs.safetensors"
    outputs = tmp_path / "outputs.safetensors"
    save_file({"x": x}, str(inputs))
    script = textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file, save_file
        from earlyexit.io import load
        net = load({saved!r})
        r = net.early_exit(load_file({str(inputs)!r})["x"])
        save_file({{"logits": r.logits, "exit_index": r.exit_index, "cost": r.cost}},
                  {str(outputs)!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    got = load_file(str(outputs))
    expected = net.early_exit(x)
    torch.testing.assert_close(got["logits"], expected.logits, rtol=0, atol=0)
    torch.testing.assert_close(got["exit_index"], expected.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(got["cost"], expected.cost, rtol=0, atol=0)


# --- loading never unpickles: only plain architecture settings rebuild a backbone ------------


@pytest.fixture
def pickle_file(tmp_path, monkeypatch) -> tuple[str, list[str]]:
    """A real torch.save'd file, and a list that records every `torch.load` call."""
    other = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(16, 3, 3, 3)}, other)
    calls: list[str] = []

    def spy(f, *args, **kwargs):
        calls.append(str(f))
        raise AssertionError("load must never call torch.load")

    monkeypatch.setattr(torch, "load", spy)
    return str(other), calls


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("checkpoint_path", "OTHER"),
        ("pretrained_cfg_overlay", {"file": "OTHER"}),
        ("pretrained", True),
        ("pretrained_cfg", {"file": "OTHER"}),
        ("cache_dir", "OTHER"),
        ("act_layer", "relu"),
    ],
)
def test_load_refuses_kwargs_that_are_not_architecture_settings(
    saved, tmp_path, pickle_file, key, value
):
    other, calls = pickle_file
    value = json.loads(json.dumps(value).replace("OTHER", other))
    kwargs = {**read_metadata(saved)["backbone"]["kwargs"], key: value}
    bad = tmp_path / "crafted.safetensors"
    backbone = {**read_metadata(saved)["backbone"], "kwargs": kwargs}
    _rewrite(saved, bad, meta_update={"backbone": backbone})
    with pytest.raises(CheckpointError, match=rf"'{key}'.*Hint:"):
        load(bad)
    assert calls == []


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_classes", {"file": "OTHER"}),
        ("global_pool", {"path": "OTHER"}),
        ("widths", [16, {"url": "OTHER"}, 64]),
    ],
)
def test_load_refuses_values_that_are_not_json_scalars_or_lists(
    saved, tmp_path, pickle_file, key, value
):
    other, calls = pickle_file
    value = json.loads(json.dumps(value).replace("OTHER", other))
    backbone = read_metadata(saved)["backbone"]
    backbone["kwargs"] = {**backbone["kwargs"], key: value}
    bad = tmp_path / "crafted.safetensors"
    _rewrite(saved, bad, meta_update={"backbone": backbone})
    with pytest.raises(CheckpointError, match=rf"'{key}'.*Hint:"):
        load(bad)
    assert calls == []


@pytest.mark.parametrize(
    "architecture", ["hf-hub:timm/resnet18.a1_in1k", "local-dir:OTHER", "hf_hub:timm/resnet18"]
)
def test_load_refuses_architectures_from_other_sources(saved, tmp_path, pickle_file, architecture):
    other, calls = pickle_file
    backbone = read_metadata(saved)["backbone"]
    backbone["architecture"] = architecture.replace("OTHER", os.path.dirname(other))
    bad = tmp_path / "crafted.safetensors"
    _rewrite(saved, bad, meta_update={"backbone": backbone})
    with pytest.raises(CheckpointError, match="Hint:"):
        load(bad)
    assert calls == []


def test_load_rebuilds_with_allowed_architecture_settings(net, saved, tmp_path, x):
    backbone = read_metadata(saved)["backbone"]
    backbone["kwargs"] = {
        **backbone["kwargs"],
        "widths": [16, 32, 64],
        "shortcut": "zero_pad",
        "zero_init_last": True,
        "global_pool": "avg",
    }
    path = tmp_path / "settings.safetensors"
    _rewrite(saved, path, meta_update={"backbone": backbone})
    assert_same_inference(net, load(path), x)


def test_allowed_settings_name_no_file_or_weights():
    from earlyexit.io import ARCHITECTURE_KWARGS

    words = ("checkpoint", "pretrained", "file", "path", "url", "overlay", "hub", "cache")
    for name in ARCHITECTURE_KWARGS - {"drop_path_rate"}:
        assert not any(word in name for word in words), name
