"""The example scripts: tiny runs on random data, an image folder, and torchrun with two ranks.

Each script runs as a subprocess, as a user would start it, on `resnet20` at 32×32 with a few
dozen samples and one epoch, on CPU. Argument parsing and the missing-data errors are checked
in-process (no model is built), which is faster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import earlyexit  # also registers resnet20 in timm

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CIFAR = EXAMPLES / "cifar_resnet.py"
FINETUNE = EXAMPLES / "finetune_timm.py"
MNIST = EXAMPLES / "mnist_eenet8.py"

# One epoch of a few steps: 48 random images, 12 test images, batches of 16.
TINY = [
    "--model", "resnet20", "--epochs", "1", "--batch-size", "16", "--workers", "0",
    "--device", "cpu", "--no-progress", "--fake-data", "48",
]  # fmt: skip


def _env() -> dict[str, str]:
    # One thread per process: two cores, and a torchrun test runs two processes.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _script(path: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(path), *args], cwd)


def _torchrun(path: Path, *args: str, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    return _run([*launcher, f"--nproc_per_node={nproc}", str(path), *args], cwd)


def _import(path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(EXAMPLES))  # the scripts import `_distributed` beside them
    spec = importlib.util.spec_from_file_location(f"example_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_image_folder(root: Path, classes: list[str], per_class: dict[str, int]) -> None:
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                # Odd sizes, so that the model's transforms do the resizing.
                pixels = rng.integers(0, 256, (36 + i, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{i}.png")


@pytest.mark.parametrize("path", [CIFAR, FINETUNE], ids=lambda p: p.stem)
def test_help_documents_the_options(path, monkeypatch):
    module = _import(path, monkeypatch)
    assert module.__doc__ and "torchrun" in module.__doc__
    text = module.build_parser().format_help()
    for option in ["--fake-data", "--data-dir", "--dist", "--n-exits", "--exit-type", "--lam"]:
        assert option in text
    for option in ["--json", "--backend", "--batch-size", "--output-dir"]:
        assert option in text


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """No network: every URL torchvision opens fails, as on a machine without access."""
    opened: list[str] = []

    def urlopen(request, *args, **kwargs):
        opened.append(getattr(request, "full_url", str(request)))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return opened


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.out
    return lines[0]


@pytest.mark.parametrize(
    "dataset, expected", [("cifar10", "cifar-10-batches-py"), ("svhn", "train_32x32.mat")]
)
def test_cifar_missing_dataset_is_a_clear_error(
    dataset, expected, tmp_path, monkeypatch, capsys, offline
):
    module = _import(CIFAR, monkeypatch)
    with pytest.raises(SystemExit) as info:
        module.main(["--dataset", dataset, "--data-dir", str(tmp_path), "--no-download"])
    assert info.value.code == 2
    err = _one_error_line(capsys)
    assert dataset in err and expected in err and "--fake-data" in err and str(tmp_path) in err
    assert "--no-download" in err and not offline


@pytest.mark.parametrize("dataset", ["cifar10", "svhn"])
def test_cifar_download_without_network_is_one_clear_line(
    dataset, tmp_path, monkeypatch, capsys, offline
):
    module = _import(CIFAR, monkeypatch)
    assert module.build_parser().parse_args([]).data_dir == "data"
    with pytest.raises(SystemExit) as info:
        module.main(["--dataset", dataset, "--data-dir", str(tmp_path)])
    assert info.value.code == 2 and offline  # it tried
    err = _one_error_line(capsys)
    assert "could not be downloaded" in err and "no network" in err and "Hint" in err
    assert str(tmp_path) in err


def _write_mnist(root: Path, train: int, test: int) -> None:
    """A tiny MNIST in torchvision's layout: the idx files `torchvision.datasets.MNIST` reads."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        header = struct.pack(">IIII", 0x803, n, 28, 28)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x801, n) + labels.tobytes()
        )


def test_mnist_runs_offline_on_data_already_there(tmp_path, monkeypatch, capsys, offline):
    module = _import(MNIST, monkeypatch)
    assert module.parse_args([]).data_dir == "data"
    _write_mnist(tmp_path / "data", train=32, test=16)
    monkeypatch.chdir(tmp_path)
    args = ["--rows", "v2", "--lams", "--epochs", "1", "--batch-size", "16", "--no-progress"]
    assert module.main([*args, "--json", "r.json", "--plot", "r.png"]) == 0
    assert not offline  # the files were there: nothing was downloaded
    assert "MNIST: 32 train / 16 test" in capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [row["label"] for row in result["table2"]] == ["EENet-8 v2"]
    assert sum(result["table2"][0]["exit_counts"]) == 16
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_mnist_without_data_or_network_is_one_clear_line(tmp_path, monkeypatch, capsys, offline):
    module = _import(MNIST, monkeypatch)
    with pytest.raises(SystemExit) as info:
        module.main(["--data-dir", str(tmp_path / "data")])
    assert info.value.code == 2 and offline
    err = _one_error_line(capsys)
    assert "MNIST is not in" in err and "could not be downloaded" in err and "Hint" in err

    with pytest.raises(SystemExit):
        module.main(["--data-dir", str(tmp_path / "data"), "--no-download"])
    err = _one_error_line(capsys)
    assert "MNIST/raw/train-images-idx3-ubyte" in err and "--no-download" in err
    assert "--fake-data" not in err  # the MNIST script has no such option


def test_finetune_missing_folders_is_a_clear_error(tmp_path, monkeypatch, capsys):
    module = _import(FINETUNE, monkeypatch)
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit) as info:
        module.main(["--data-dir", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "val/" in err and "ImageFolder" in err


def test_cifar_resnet_fake_data(tmp_path):
    out = tmp_path / "out"
    proc = _script(
        CIFAR, *TINY, "--dist", "pareto", "--json", "r.json", "--output-dir", str(out),
        cwd=tmp_path,
    )  # fmt: skip
    # The paper's table layout, with EENet-20's three exits at 25, 37 and 57 % of the cost.
    assert "Cost percent of EE-blocks" in proc.stdout and "Relative cost" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("EENet-20 "))
    assert "pareto" in row and "25, 37, 57" in row

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["model"] == "resnet20" and result["n_exits"] == 3
    assert result["cost_percent"] == [25, 37, 57]
    assert result["test_samples"] == 12 and sum(result["exit_counts"]) == 12
    assert 0.0 <= result["accuracy"] <= 1.0
    costs = result["exit_costs"]
    assert costs[0] - 1e-9 <= result["relative_cost"] <= costs[-1] + 1e-9
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0]["loss"])
    assert (out / "config.json").is_file()
    loaded = earlyexit.load(result["checkpoint"])  # the checkpoint is a complete earlyexit file
    assert loaded.num_exits == 3 and loaded.exit_costs.tolist() == pytest.approx(costs)


def test_finetune_timm_image_folder_with_frozen_backbone(tmp_path):
    classes = ["cat", "dog", "fox"]
    _write_image_folder(tmp_path / "data", classes, {"train": 8, "val": 3})
    # "Pretrained" weights from a local file, trained for 10 classes: the classifier is new.
    weights = timm.create_model("resnet20").state_dict()
    torch.save(weights, tmp_path / "resnet20.pth")
    out = tmp_path / "out"
    args = [
        "--model", "resnet20", "--checkpoint", "resnet20.pth", "--freeze-backbone",
        "--data-dir", "data", "--epochs", "1", "--batch-size", "8", "--workers", "0",
        "--device", "cpu", "--no-progress", "--thresholds", "0.3", "0.5", "0.9",
        "--json", "r.json", "--output-dir", str(out),
    ]  # fmt: skip
    proc = _script(FINETUNE, *args, cwd=tmp_path)
    assert "never" in proc.stdout and "accuracy" in proc.stdout

    result = json.loads((tmp_path / "r.json").read_text())
    assert result["classes"] == classes and result["freeze_backbone"] is True
    thresholds = [row["threshold"] for row in result["tradeoff"]]
    assert thresholds[:3] == [0.3, 0.5, 0.9] and thresholds[-1] > 1
    for row in result["tradeoff"]:
        assert sum(row["exit_counts"]) == 9
    assert result["tradeoff"][-1]["exit_counts"] == [0, 0, 0, 9]  # never: all at the final exit

    # The frozen backbone kept the checkpoint's weights and statistics; the new classifier
    # (3 classes) trained.
    path = Path(result["checkpoint"])
    assert path.is_file()
    state = torch.load(path, weights_only=True) if path.suffix == ".pt" else None
    if state is None:
        from earlyexit.io import load

        state = load(path).state_dict()
    for name, tensor in weights.items():
        if not name.startswith("fc."):
            torch.testing.assert_close(state[f"backbone.{name}"], tensor, rtol=0, atol=0)
    assert state["backbone.fc.weight"].shape == (3, 64)


def test_torchrun_two_ranks_end_with_identical_weights(tmp_path):
    # 64 images: each rank takes 32, in 4 steps of 8; 16 validation images split 8 / 8.
    args = [*TINY[:-1], "64", "--thresholds", "0.5", "--json", "r.json", "--no-save"]
    proc = _torchrun(FINETUNE, *args, "--digest-dir", "digests", cwd=tmp_path)
    digests = [(tmp_path / "digests" / f"rank{r}.sha256").read_text() for r in range(2)]
    assert digests[0] == digests[1]

    # Only rank 0 prints the tables; evaluation counts every validation image exactly once.
    assert proc.stdout.count("accuracy/cost trade-off") == 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["world_size"] == 2
    assert sum(result["exit_counts"]) == 16
    assert all(sum(row["exit_counts"]) == 16 for row in result["tradeoff"])


@pytest.mark.slow
def test_finetune_timm_fake_data(tmp_path):
    proc = _script(FINETUNE, *TINY, "--json", "-", "--no-save", cwd=tmp_path)
    result = json.loads(proc.stdout[proc.stdout.index("{\n") :])
    assert result["n_exits"] == 3 and result["classes"] == [str(i) for i in range(10)]
    assert sum(result["exit_counts"]) == 12


@pytest.mark.slow
def test_torchrun_cifar_resnet_two_ranks(tmp_path):
    args = [*TINY[:-1], "64", "--eval-every", "1", "--epochs", "2", "--json", "r.json"]
    _torchrun(CIFAR, *args, "--no-save", "--digest-dir", "digests", cwd=tmp_path)
    digests = [(tmp_path / "digests" / f"rank{r}.sha256").read_text() for r in range(2)]
    assert digests[0] == digests[1]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["world_size"] == 2 and result["test_samples"] == 16
    assert len(result["history"]) == 2 and "accuracy" in result["history"][0]


@pytest.mark.parametrize("frozen", [True, False], ids=["frozen", "unfrozen"])
def test_finetune_mnist_standin_compares_with_the_model_it_started_from(
    tmp_path, monkeypatch, offline, frozen
):
    module = _import(FINETUNE, monkeypatch)
    _write_mnist(tmp_path / "data", train=64, test=32)
    monkeypatch.chdir(tmp_path)
    args = [
        "--model", "resnet8", "--mnist-standin", "--data-dir", "data", "--standin-epochs", "1",
        "--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu",
        "--no-progress", "--no-save", "--json", "r.json",
    ]  # fmt: skip
    assert module.main([*args, *(["--freeze-backbone"] if frozen else [])]) == 0
    assert not offline  # the files were there: nothing was downloaded
    result = json.loads((tmp_path / "r.json").read_text())
    start = result["start"]
    assert result["dataset"] == "mnist" and result["input_size"] == [1, 28, 28]
    assert sum(result["exit_counts"]) == 32
    # Frozen, the final exit is the pre-trained model itself; unfrozen, it was trained on.
    assert start["final_exit_identical"] is frozen
    if frozen:
        assert start["final_exit_accuracy"] == start["start_accuracy"]
