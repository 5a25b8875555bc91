"""Exported stages and heads reproduce eager early-exit inference."""

from __future__ import annotations

import importlib.util
import json

import pytest
import timm
import torch

import earlyexit
from earlyexit.export import ExportedEarlyExit, export_onnx, export_stages

from toy_models import spread_confidences

NEVER = 2.0


SIZE = (1, 28, 28)  # resnet8, the paper's MNIST model: the quickest to export


@pytest.fixture(scope="module")
def net() -> earlyexit.EarlyExitNet:
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet8", num_classes=10), n_exits=3)
    spread_confidences(net, torch.randn(32, *SIZE))
    return net.eval()


@pytest.fixture(scope="module")
def exported(net) -> tuple[ExportedEarlyExit, bool]:
    """The runner, exported from a net in train mode; and whether it was still in train mode."""
    net.train()
    try:
        # A batch of one: the export must still leave the batch axis dynamic.
        runner = export_stages(net, torch.randn(1, *SIZE))
        still_training = net.training and all(h.training for h in net.heads)
    finally:
        net.eval()
    return runner, still_training


@pytest.fixture
def runner(exported) -> ExportedEarlyExit:
    return exported[0]


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(20, *SIZE, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("threshold", [None, 0.0, 0.3, 0.5, 0.8, NEVER])
def test_exported_equals_eager(net, runner, x, threshold):
    expected = net.early_exit(x, threshold)
    got = runner(x, threshold)
    torch.testing.assert_close(got.exit_index, expected.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.cost, expected.cost, rtol=0, atol=0)
    if threshold == 0.5:
        assert len(set(got.exit_index.tolist())) > 1


@pytest.mark.parametrize("batch", [1, 2, 7])
def test_any_batch_size(net, runner, batch):
    x = torch.randn(batch, *SIZE)
    got, expected = runner(x), net.early_exit(x)
    torch.testing.assert_close(got.exit_index, expected.exit_index, rtol=0, atol=0)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-5)


def test_runner_attributes(net, runner):
    assert runner.num_exits == net.num_exits
    assert len(runner.stages) == net.num_exits + 1
    assert all(isinstance(ep, torch.export.ExportedProgram) for ep in runner.stages)
    assert runner.exit_names == net.exit_names
    assert runner.threshold == net.threshold
    torch.testing.assert_close(runner.exit_costs, net.exit_costs)
    assert "num_exits=3" in repr(runner)
    with pytest.raises(ValueError, match="threshold"):
        runner(torch.randn(2, *SIZE), -1.0)


def test_export_leaves_the_net_in_its_mode(exported):
    assert exported[1]


def test_export_rejects_bad_arguments(net):
    with pytest.raises(TypeError, match="EarlyExitNet"):
        export_stages(torch.nn.Linear(2, 2), torch.randn(2, 2))
    with pytest.raises(ValueError, match="batch"):
        export_stages(net, torch.randn(0, *SIZE))


@pytest.fixture(scope="module")
def onnx_dir(net, tmp_path_factory):
    pytest.importorskip("onnx")
    directory = tmp_path_factory.mktemp("onnx")
    export_onnx(net, directory)
    return directory


def test_onnx_files(net, onnx_dir):
    import onnx

    names = sorted(p.name for p in onnx_dir.iterdir())
    assert names == sorted(
        ["earlyexit.json"]
        + [f"stage_{i}.onnx" for i in range(4)]
        + [f"head_{i}.onnx" for i in range(3)]
    )
    for i in range(4):
        model = onnx.load(str(onnx_dir / f"stage_{i}.onnx"))
        onnx.checker.check_model(model)
        dim = model.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim.dim_param == "batch"
    meta = json.loads((onnx_dir / "earlyexit.json").read_text())
    assert meta["exit_names"] == net.exit_names
    assert meta["exit_costs"] == pytest.approx(net.exit_costs.tolist())
    assert meta["threshold"] == net.threshold and meta["num_classes"] == 10


def test_onnx_head_and_stage_compute_the_same(net, onnx_dir):
    from onnx.reference import ReferenceEvaluator

    x = torch.randn(3, *SIZE)
    with torch.no_grad():
        feature = net.stages()[0](x)
        logits, confidence = net.heads[0](feature)
    (y,) = ReferenceEvaluator(str(onnx_dir / "stage_0.onnx")).run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(y), feature, rtol=1e-4, atol=1e-4)
    z, a = ReferenceEvaluator(str(onnx_dir / "head_0.onnx")).run(None, {"x": feature.numpy()})
    torch.testing.assert_close(torch.from_numpy(z), logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(a), confidence, rtol=1e-4, atol=1e-4)


def test_onnx_pieces_reproduce_early_exit(net, onnx_dir, x):
    """Early-exit inference written against the ONNX files alone, as a runtime would."""
    import numpy as np
    from onnx.reference import ReferenceEvaluator

    meta = json.loads((onnx_dir / "earlyexit.json").read_text())
    n = meta["num_exits"]
    stages = [ReferenceEvaluator(str(onnx_dir / f"stage_{i}.onnx")) for i in range(n + 1)]
    heads = [ReferenceEvaluator(str(onnx_dir / f"head_{i}.onnx")) for i in range(n)]
    h, alive = x.numpy(), np.arange(len(x))
    logits = np.zeros((len(x), meta["num_classes"]), np.float32)
    exits = np.full(len(x), n)
    for i in range(n):
        (h,) = stages[i].run(None, {"x": h})
        z, a = heads[i].run(None, {"x": h})
        leave = 1 / (1 + np.exp(-a)) >= meta["threshold"]
        logits[alive[leave]], exits[alive[leave]] = z[leave], i
        h, alive = h[~leave], alive[~leave]
    if len(alive):
        (z,) = stages[n].run(None, {"x": h})
        logits[alive] = z
    expected = net.early_exit(x)
    assert exits.tolist() == expected.exit_index.tolist()
    torch.testing.assert_close(torch.from_numpy(logits), expected.logits, rtol=1e-4, atol=1e-4)


def test_onnx_needs_onnx(net, tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "onnx" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError, match=r"earlyexit\[onnx\]"):
        export_onnx(net, tmp_path)
