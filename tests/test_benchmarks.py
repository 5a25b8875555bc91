"""The benchmark scripts' bookkeeping: what they keep, merge and draw (no timing is asserted)."""

from __future__ import annotations

import functools
import importlib
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import ModuleType
from unittest import mock

import pytest
import timm
import torch

import earlyexit
from earlyexit.cuda_graphs import _eager

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    """Import a benchmark script by its name, as its worker processes will (spawned ones too)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))

    def load(name: str) -> ModuleType:
        monkeypatch.delitem(sys.modules, name, raising=False)
        return importlib.import_module(name)

    return load


def _record(name: str, status: str) -> dict:
    return {"source": "timm", "name": name, "status": status, "seconds": 0.0}


def test_zoo_retry_runs_again_only_the_selected_models(script, tmp_path):
    zoo = script("zoo")
    out = tmp_path / "zoo"
    kept = _record("model_not_selected", "unsupported")
    out.with_suffix(".json").write_text(json.dumps([kept, _record("test_resnet", "crash")]))
    argv = ["--source", "timm", "--filter", "test_resnet", "--resume", "--retry", "--out", str(out)]
    assert zoo.main([*argv, "--workers", "1", "--timeout-per-model", "300"]) == 0
    records = {r["name"]: r for r in json.loads(out.with_suffix(".json").read_text())}
    assert records["model_not_selected"] == kept  # outside the selection: left as it was
    assert records["test_resnet"]["status"] == "converted"  # selected and failed before: run again
    assert "| timm | 2 | 1 | 1 |" in out.with_suffix(".md").read_text()


def test_speed_replot_draws_saved_results(script, tmp_path):
    pytest.importorskip("matplotlib")
    speed = script("speed")
    row = {
        "device": "cpu",
        "threads": 1,
        "compile": False,
        "channels_last": False,
        "amp": False,
        "efficiency": 0.9,
        "overhead": 1.0,
    }
    saved = tmp_path / "speed.json"
    rows = [{**row, "batch_size": b} for b in (4, 1)]
    saved.write_text(json.dumps({"rows": [*rows, {**row, "batch_size": 8, "device": "cuda"}]}))
    series = speed.load_series([saved])
    assert sorted(series) == ["cpu, 1 thr", "cuda"]
    png = tmp_path / "speed.png"
    assert speed.main(["--replot", str(saved), "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit):  # --replot without --plot: nothing to write to
        speed.main(["--replot", str(saved)])


def test_speed_time_ideal_on_a_hand_made_example(script):
    speed = script("speed")
    # 4 samples: 2 leave at exit 0, 1 at exit 1, 1 at the final exit 2.
    histogram, stages, heads = [2, 1, 1], [1.0, 2.0, 4.0], [0.5, 0.5]
    assert speed.reach_shares(histogram) == [1.0, 0.5, 0.25]
    # 1 * (1 + 0.5) + 0.5 * (2 + 0.5) + 0.25 * 4
    assert speed.ideal_time_per_sample(histogram, stages, heads) == pytest.approx(3.75)
    assert speed.time_ideal(7.5, histogram, stages, heads) == pytest.approx(2.0)
    # Nobody leaves early: every stage and head at full batch, for every sample.
    assert speed.ideal_time_per_sample([0, 0, 3], stages, heads) == pytest.approx(8.0)
    assert speed.ideal_time_per_sample([5, 0, 0], stages, heads) == pytest.approx(1.5)
    assert speed.mac_ideal(0.5) == 2.0
    with pytest.raises(ValueError, match="2 head times"):
        speed.ideal_time_per_sample(histogram, stages, heads[:1])


TINY = ["--model", "resnet20", "--n-exits", "3", "--threads", "1", "--rounds", "1"]


def test_speed_new_methods_fill_rows_and_skip_graphs_on_cpu(script, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    speed = script("speed")
    saved, png = tmp_path / "speed.json", tmp_path / "speed.png"
    argv = [*TINY, "--devices", "cpu", "--batch-sizes", "4", "--samples", "8"]
    assert speed.main([*argv, "--json", str(saved), "--plot", str(png)]) == 0
    printed = capsys.readouterr().out
    assert "early_exit_graphs and predict_graphs skipped: CUDA graphs need a CUDA device" in printed
    assert max(map(len, printed.splitlines())) <= 100, printed
    payload = json.loads(saved.read_text())
    (row,) = payload["rows"]
    assert payload["complete"] is True
    assert row["efficiency"] > 0 and row["overhead"] > 0 and row["speedup_vs_reference"] > 0
    assert row["baseline"] in ("original_folded", "original") and row["stage_timing"] == "eager"
    assert list(row["methods"]) == ["original_folded", "original", "early_exit", "predict"]
    assert len(row["stage_ms_per_sample"]) == 4 and len(row["head_ms_per_sample"]) == 3
    assert len(row["notes"]) == 1 and row["notes"][0].startswith("early_exit_graphs and")
    methods = ("original_folded", "original", "early_exit", "predict")
    folded, original, early, stream = (row["methods"][m] for m in methods)
    base = row["methods"][row["baseline"]]  # the faster of the two originals
    assert base["ms_per_sample"] == min(folded["ms_per_sample"], original["ms_per_sample"])
    assert base["speedup"] == 1.0 and base["mac_ideal"] is None
    other = folded if base is original else original
    assert other["speedup"] == pytest.approx(base["ms_per_sample"] / other["ms_per_sample"])
    assert early["ms_per_sample"] == row["ms_per_sample_early_exit"]
    assert early["ms_per_sample_no_exit"] == row["ms_per_sample_no_exit"]
    assert early["exit_histogram"] == stream["exit_histogram"] == row["exit_histogram"]
    assert sum(row["exit_histogram"]) == 8
    for m in (early, stream):
        assert m["mac_ideal"] == pytest.approx(1 / row["mean_cost"])
        assert m["time_ideal"] > 0 and m["overhead"] > 0 and m["speedup"] > 0
    assert row["time_ideal"] == early["time_ideal"] and row["mac_ideal"] == early["mac_ideal"]
    assert png.exists() and (tmp_path / "speed-speedup.png").read_bytes()[:4] == b"\x89PNG"
    (loaded,) = speed.load_rows(saved)
    assert isinstance(loaded.methods["predict"], speed.MethodResult)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_speed_force_pattern_sends_the_counts_out_of_an_untrained_net(script, dtype):
    # Untrained heads barely tell samples apart; in bfloat16 most tied, and every sample left
    # at exit 0 (the preset on a GPU stopped with an IndexError at exit 1).
    speed = script("speed")
    torch.manual_seed(0)
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
    x = torch.randn(64, 3, 32, 32)
    counts = [16, 16, 16, 16]

    def autocast():  # a region of its own each: autocast keeps the weights it cast
        return torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None)

    with autocast():
        speed.force_pattern(net, x, counts, chunk=32)
    net.threshold = 0.5
    with autocast(), torch.no_grad():
        histogram = torch.bincount(net.early_exit(x).exit_index, minlength=4).tolist()
    if dtype is None:
        assert histogram == counts
    else:  # samples can tie in half precision: about the counts
        assert all(abs(n - 16) <= 6 for n in histogram), histogram


def test_speed_a_run_stopped_early_keeps_the_rows_it_measured(script, tmp_path, monkeypatch):
    speed = script("speed")
    measure = speed.measure

    def stopped_at_the_second_row(args, device, batch_size, *rest):
        if batch_size == 2:
            raise KeyboardInterrupt  # as the GPU check's time limit stops a run
        return measure(args, device, batch_size, *rest)

    monkeypatch.setattr(speed, "measure", stopped_at_the_second_row)
    saved = tmp_path / "speed.json"
    argv = [*TINY, "--devices", "cpu", "--batch-sizes", "4", "2", "--samples", "8"]
    with pytest.raises(KeyboardInterrupt):
        speed.main([*argv, "--methods", "original", "early_exit", "--json", str(saved)])
    payload = json.loads(saved.read_text())
    assert payload["complete"] is False
    assert [row["batch_size"] for row in payload["rows"]] == [4]
    (row,) = speed.load_rows(saved)
    assert row.overhead > 0
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"]


def test_speed_a_run_stopped_while_it_writes_keeps_the_last_write(script, tmp_path, monkeypatch):
    speed = script("speed")
    dump = json.dump
    writes = []

    def stopped_in_the_second_write(payload, f, **kwargs):
        writes.append(len(payload["rows"]))
        if len(writes) == 2:
            f.write('{"rows": [')  # half a file, as a write cut short leaves it
            raise KeyboardInterrupt
        return dump(payload, f, **kwargs)

    monkeypatch.setattr(speed.json, "dump", stopped_in_the_second_write)
    saved = tmp_path / "speed.json"
    argv = [*TINY, "--devices", "cpu", "--batch-sizes", "4", "2", "--samples", "8"]
    with pytest.raises(KeyboardInterrupt):
        speed.main([*argv, "--methods", "original", "early_exit", "--json", str(saved)])
    assert writes == [1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"]  # the half write is gone
    monkeypatch.setattr(speed.json, "dump", dump)
    payload = json.loads(saved.read_text())
    assert payload["complete"] is False
    assert [row["batch_size"] for row in payload["rows"]] == [4]


def test_speed_times_the_work_queued_on_a_cuda_device_not_its_launch(script, monkeypatch):
    # A stand-in device: each call queues 50 ms of work and returns at once, as a CUDA call
    # returns once its kernels are launched; synchronising waits for what is queued.
    speed = script("speed")
    queued = []

    def launch() -> None:
        queued.append(0.05)

    def synchronize(device=None) -> None:
        while queued:
            time.sleep(queued.pop())

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    cuda = torch.device("cuda")
    seconds = speed.timed(launch, 1, cuda)
    # The timed call's work counts; that of `Timer`'s two untimed calls before it does not.
    assert 0.05 <= seconds < 0.1, seconds
    assert speed.timed(launch, 1, torch.device("cpu")) < 0.01  # no device to wait for on CPU
    queued.clear()
    speed.warm_up(launch, 0.0, cuda)
    assert not queued  # warm-up leaves no work behind to be timed with the next function


def test_speed_micro_batches_join_the_baselines(script, capsys):
    speed = script("speed")
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=3).eval()
    assert speed.auto_micro_batch(net, torch.zeros(1, 3, 32, 32)) == 64
    assert net.micro_batch is None  # put back
    argv = [*TINY, "--devices", "cpu", "--batch-sizes", "4", "--samples", "8", "--no-reference"]
    shares = speed.pattern_shares("uniform", 3)
    args = speed.build_parser().parse_args([*argv, "--micro-batch", "3"])
    row = speed.measure(args, torch.device("cpu"), 4, shares, {})
    assert row.micro_batch == 3 and "micro-batches of 3" in " ".join(row.notes)
    candidates = speed.CPU_BASELINES
    assert list(row.methods)[:4] == list(candidates)
    fastest = min(candidates, key=lambda m: row.methods[m].ms_per_sample)
    assert row.baseline == fastest
    # by default the net runs whole batches, and so do the originals
    row = speed.measure(speed.build_parser().parse_args(argv), torch.device("cpu"), 4, shares, {})
    assert row.micro_batch is None and not any("micro" in m for m in row.methods)
    assert not any("micro-batches of" in note for note in row.notes)
    args = speed.build_parser().parse_args([*argv, "--micro-batch", "auto"])  # 64 > 4
    row = speed.measure(args, torch.device("cpu"), 4, shares, {})
    assert row.micro_batch is None and "original_micro" not in row.methods
    with pytest.raises(SystemExit):
        speed.build_parser().parse_args([*argv, "--micro-batch", "0"])
    assert "positive int" in capsys.readouterr().err


@pytest.mark.parametrize(
    "options", [[], ["--amp", "--amp-dtype", "bfloat16", "--channels-last"]], ids=["fp32", "bf16"]
)
def test_speed_graph_methods_bookkeeping_with_eager_stand_ins(script, monkeypatch, options):
    """The CUDA-only paths, with the graphs replaced by the same steps run eagerly (and, as
    the preset runs them on a GPU, under bfloat16 autocast in channels_last)."""
    speed = script("speed")
    captured = []

    def capture_runner(net, batch_sizes):
        captured.append(batch_sizes)
        return _eager(net, batch_sizes)

    monkeypatch.setattr(speed, "graphs_unavailable", lambda device, args: None)
    monkeypatch.setattr(speed, "capture_graph", lambda fn: fn)
    monkeypatch.setattr(speed, "capture_runner", capture_runner)
    argv = [*TINY, "--samples", "8", "--no-reference", *options]
    args = speed.build_parser().parse_args(argv)
    row = speed.measure(args, torch.device("cpu"), 4, speed.pattern_shares("uniform", 3), {})
    assert row.baseline == "original_graphs" and row.stage_timing == "cuda_graphs"
    # no micro-batches on CUDA
    assert list(row.methods) == [m for m in speed.METHOD_ORDER if "micro" not in m]
    assert row.methods["original_graphs"].speedup == 1.0
    for name in ("early_exit_graphs", "predict_graphs"):
        assert row.methods[name].exit_histogram == row.exit_histogram
        assert row.methods[name].setup_s is not None and row.methods[name].overhead > 0
    # early_exit_graphs captured once at batch 4 (and the powers of two below), predict's
    # graphs once at its batch size, though predict ran in every round and without exits.
    assert captured == [4, (4,)]
    assert not row.notes


def test_speed_old_results_load_with_defaults_and_replot(script, tmp_path):
    pytest.importorskip("matplotlib")
    speed = script("speed")
    saved = sorted((BENCHMARKS / "results").glob("speed-*.json"))
    assert saved
    old = [path for path in saved if '"methods"' not in path.read_text()]
    assert old, "the results measured before the per-method comparison are gone"
    for path in old:
        for row in speed.load_rows(path):
            assert row.methods == {} and row.baseline == "original" and row.time_ideal is None
    for path in set(saved) - set(old):
        assert all(row.methods for row in speed.load_rows(path))
    png = tmp_path / "old.png"
    assert speed.main(["--replot", *map(str, saved), "--plot", str(png)]) == 0
    assert png.exists() and (tmp_path / "old-speedup.png").exists()


def test_speed_show_prints_saved_rows_with_the_spread_of_their_rounds(script, tmp_path, capsys):
    speed = script("speed")
    name = "speed-cpu-2core-batch256-foldedheads-run1.json"
    saved = json.loads((BENCHMARKS / "results" / name).read_text())
    row = saved["rows"][0]
    row["mean_cost"], row["c_n"], row["baseline"] = 0.5, 1.0, "original_folded"
    # Overhead (no_exit ÷ baseline) 1.1, 0.9, 1.0; efficiency (no_exit ÷ early_exit) × 0.5
    # 1.0, 0.8, 0.9.
    rounds = [
        {"original_folded": 1.0, "no_exit": 1.1, "early_exit": 0.55},
        {"original_folded": 1.0, "no_exit": 0.9, "early_exit": 0.5625},
        {"original_folded": 2.0, "no_exit": 2.0, "early_exit": 1 / 0.9},
    ]
    row["rounds"] = [*rounds, {"original_folded": 1.0}]  # one without the times: left out
    path = tmp_path / "saved.json"
    path.write_text(json.dumps(saved))
    assert speed.main(["--show", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("saved.json: 1 row\n") and "original_folded*" in printed
    expected = "overhead 0.900-1.100, median 1.000; efficiency 0.800-1.000, median 0.900."
    assert f"Per round (3): {expected}" in printed
    # The medians are what `--stat median` reports for the same rounds.
    summary = speed.Summary(rounds, "median")
    assert summary.ratio(speed.key("no_exit"), speed.key("original_folded")) == pytest.approx(1.0)
    assert summary.ratio(speed.key("no_exit"), speed.key("early_exit")) * 0.5 == pytest.approx(0.9)


def test_speed_preset_runs_each_model_with_its_settings(script, tmp_path, monkeypatch):
    speed = script("speed")
    args = speed.build_parser().parse_args(["--preset", "issue"])
    resnet110, resnet50, deit = speed.PRESETS["issue"]
    assert [(m.model, m.n_exits) for m in (resnet110, resnet50, deit)] == [
        ("resnet110", 10),
        ("resnet50", 4),
        ("deit_small_patch16_224", 4),
    ]
    on_cpu = speed.preset_args(args, resnet50, torch.device("cpu"))
    assert on_cpu.batch_sizes == [16] and on_cpu.samples == 16 * 16
    assert on_cpu.input_size == [3, 224, 224] and on_cpu.num_classes == 1000
    assert not on_cpu.amp and on_cpu.channels_last and on_cpu.pattern == "uniform"
    assert not speed.preset_args(args, deit, torch.device("cpu")).channels_last
    on_cuda = speed.preset_args(args, resnet110, torch.device("cuda"))
    assert on_cuda.batch_sizes == [256] and on_cuda.samples == 32 * 256
    assert on_cuda.amp and on_cuda.amp_dtype == "bfloat16" and not on_cuda.reference
    assert on_cuda.channels_last and on_cuda.dist == "pareto"
    assert not speed.preset_args(args, deit, torch.device("cuda")).channels_last
    with pytest.raises(SystemExit):  # one JSON per model: --json-dir, not --json
        speed.main(["--preset", "issue", "--json", str(tmp_path / "x.json")])

    tiny = speed.PresetModel("resnet20", 2, 10, None, True, {"cpu": 4, "cuda": 8})
    monkeypatch.setitem(speed.PRESETS, "issue", (tiny,))
    argv = ["--preset", "issue", "--devices", "cpu", "--threads", "1", "--rounds", "1"]
    assert speed.main([*argv, "--samples", "8", "--json-dir", str(tmp_path / "out")]) == 0
    payload = json.loads((tmp_path / "out" / "speed-resnet20.json").read_text())
    assert payload["preset"] == "issue"
    (row,) = payload["rows"]
    assert (row["model"], row["batch_size"], len(row["exit_histogram"])) == ("resnet20", 4, 3)


def test_speed_folds_the_baseline_s_norms_or_says_why_not(script):
    speed = script("speed")
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()
    ).eval()
    folded, why_not = speed.fold_original(model)
    # One call: the convolution with the norm folded in and the ReLU applied by it.
    (call,) = [n for n in folded.graph.nodes if n.op == "call_module"]
    assert why_not is None and type(folded.get_submodule(call.target)).__name__ == "FusedConv"
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x))

    class DataDependent(torch.nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x  # control flow on values: fx cannot trace it

    model = DataDependent()
    same, why_not = speed.fold_original(model)
    assert same is model and "could not trace" in why_not


def test_recipe_variants_and_its_confidence_targets(script, monkeypatch):
    recipe = script("recipe")
    spec = recipe.parse_variant("conf=harmless,gs=0.1")
    assert spec == {
        "loss": "exits",
        "head": "conv",
        "zi": "0",
        "hg": "2",  # the library's LAYOUT_GRID
        "conf": "harmless",
        "gs": "0.1",
    }
    assert recipe.parse_variant("hg=1")["hg"] == "1"
    with pytest.raises(SystemExit, match="conf is right or harmless"):
        recipe.parse_variant("conf=maybe")
    assert recipe.parse_variant("ci=random")["ci"] == "random"
    with pytest.raises(SystemExit, match="ci is prior or random"):
        recipe.parse_variant("ci=zero")
    with pytest.raises(SystemExit, match="keys are"):
        recipe.parse_variant("nope=1")
    with pytest.raises(SystemExit, match="cd is 0 or 1"):
        recipe.parse_variant("cd=yes")
    # pg=4 is the library's own pooling; pg=2 pools to at most 2x2.
    sizes = (32, 28, 14, 7)
    pool_window = earlyexit.heads.pool_window
    assert [pool_window(n, grid=4) for n in sizes] == [pool_window(n) for n in sizes]
    assert [pool_window(n, grid=2) for n in sizes] == [16, 14, 7, 7]
    coarse = functools.partial(pool_window, grid=2)
    with mock.patch.object(earlyexit.heads, "pool_window", coarse):  # as run_one patches it
        head = earlyexit.heads.create_head("conv", (16, 28, 28), 1, 10)
    assert head.conv[0].kernel_size == (14, 14)
    # hg=1 is the earlier head, one cell after its convolution; hg=2 the library's.
    one_cell = functools.partial(earlyexit.heads.ExitHead, layout=1)
    model = timm.create_model("resnet8", in_chans=1)
    with mock.patch.object(earlyexit.model, "ExitHead", one_cell):  # as run_one patches it
        net = earlyexit.convert(model, n_exits=2, input_size=(1, 28, 28))
    assert [h.cells for h in net.heads] == [1, 1]
    assert [h.cells for h in earlyexit.convert(net.backbone, n_exits=2).heads] == [4, 4]
    labels = torch.tensor([0, 1, 2, 3])
    exit_says = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 1]), 4).float().log()
    final_says = torch.nn.functional.one_hot(torch.tensor([0, 1, 0, 2]), 4).float().log()
    right = earlyexit.loss._confidence_labels(exit_says, final_says, labels)
    assert right.tolist() == [True, False, False, False]
    harmless = recipe._harmless_labels(exit_says, final_says, labels)
    assert harmless.tolist() == [True, False, True, True]  # the final exit is wrong on 2 and 3
    # The loss takes its targets from the seam that the benchmark swaps.
    calls = []

    def counting(*args):
        calls.append(args)
        return recipe._harmless_labels(*args)

    monkeypatch.setattr(earlyexit.loss, "_confidence_labels", counting)
    torch.manual_seed(0)
    outputs = earlyexit.ExitOutputs(
        logits=[torch.randn(4, 4) for _ in range(3)],
        confidence_logits=[torch.randn(4) for _ in range(2)],
        costs=torch.tensor([0.3, 0.6, 1.0]),
    )
    earlyexit.EENetLoss()(outputs, labels)
    assert len(calls) == 2  # one per early exit


def test_recipe_detached_confidence_never_trains_the_features(script):
    recipe = script("recipe")
    torch.manual_seed(0)
    head = earlyexit.heads.create_head("conv", (8, 8, 8), 1, 10)
    torch.nn.init.normal_(head.confidence.weight)  # as after training: it reads the features
    x = torch.randn(4, 8, 8, 8, requires_grad=True)
    _, confidence = head(x)
    confidence.sum().backward()
    assert x.grad.abs().sum() > 0  # by default the confidence's loss reaches the features
    head.confidence.register_forward_pre_hook(recipe._detach_input)
    x.grad = None
    head.zero_grad()
    _, confidence = head(x)
    confidence.sum().backward()
    assert x.grad is None  # cut: nothing reaches the features
    assert head.confidence.weight.grad.abs().sum() > 0  # the branch itself still learns


def test_recipe_overlay_keeps_labels_and_mixes_in_another_digit(script):
    recipe = script("recipe")
    from earlyexit.models.mnist_resnet import MNIST_MEAN, MNIST_STD

    raw = torch.rand(50, 1, 28, 28)
    labels = torch.arange(50) % 10
    data = torch.utils.data.TensorDataset((raw - MNIST_MEAN[0]) / MNIST_STD[0], labels)
    first = recipe.overlay_digits(data, seed=0)
    again = recipe.overlay_digits(data, seed=0)
    other = recipe.overlay_digits(data, seed=1)
    assert torch.equal(first.tensors[0], again.tensors[0])  # a fixed data set, not a draw per run
    assert not torch.equal(first.tensors[0], other.tensors[0])
    assert torch.equal(first.tensors[1], labels)
    mixed = first.tensors[0] * MNIST_STD[0] + MNIST_MEAN[0]
    # Never darker than the image itself, never brighter than the brighter of the two images.
    assert (mixed >= raw - 1e-5).all()
    assert (mixed <= raw.amax(0, keepdim=True).expand_as(raw) + 1e-5).all()
    assert (mixed > raw + 1e-3).any()  # something was mixed in
    hard = recipe.SETTINGS["mnist-r20h"]
    assert hard["overlay"] and hard["train"] is None  # all 60,000 training images


def test_recipe_relative_precision_shift(script, monkeypatch):
    recipe = script("recipe")
    labels = torch.zeros(10, dtype=torch.long)
    for right, q in [(9, 1 - 1.3 * 0.1), (10, 0.95), (0, 0.5)]:  # q's cap and floor
        final = torch.full((10, 3), -5.0)
        final[:right, 0] = 5.0
        final[right:, 1] = 5.0
        shift = recipe._relative_precision_logit(0.95, final.log_softmax(1), labels)
        assert float(shift) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    assert recipe._fixed_precision_logit(0.8, None, None) == pytest.approx(math.log(4))
    # The loss takes its shift from the seam that the benchmark swaps.
    seen = []
    monkeypatch.setattr(earlyexit.loss, "_precision_logit", lambda q, *rest: seen.append(q) or 0.0)
    outputs = earlyexit.ExitOutputs(
        logits=[torch.randn(4, 4) for _ in range(2)],
        confidence_logits=[torch.randn(4)],
        costs=torch.tensor([0.5, 1.0]),
    )
    earlyexit.EENetLoss(exit_precision=0.9)(outputs, labels[:4])
    assert seen == [0.9]


def test_fresh_times_each_method_in_a_process_of_its_own(script, tmp_path, capsys):
    fresh = script("fresh")
    saved = tmp_path / "fresh.json"
    argv = ["--model", "resnet20", "--n-exits", "3", "--batch-size", "8", "--threads", "1"]
    argv += ["--runs", "1", "--calls", "1", "--methods", "early_exit", "no_exit_micro", "predict"]
    assert fresh.main([*argv, "--json", str(saved)]) == 0
    printed = capsys.readouterr().out
    assert "early_exit" in printed and "no_exit_micro" in printed
    runs = json.loads(saved.read_text())["runs"]
    assert [r["method"] for r in runs] == ["early_exit", "no_exit_micro", "predict"]
    assert all(r["ms_per_sample"] > 0 and r["faults_per_call"] >= 0 for r in runs)
    assert runs[0]["micro_batch"] is None  # resnet20's 64 is more than the batch of 8
    assert 0 < runs[0]["mean_cost"] < runs[0]["c_n"]
    assert sum(runs[0]["exit_histogram"]) == 8 and runs[0]["exit_histogram"][0] > 0
    # Only the processes of the methods that leave early measure a time ideal.
    assert runs[1]["time_ideal_ms"] is None
    for r in (runs[0], runs[2]):
        assert r["time_ideal_ms"] > 0
    assert "time ideal of early_exit" in printed and "time ideal of predict" in printed


# The stem's convolution and two per block of nine are fused (the graph's; whether oneDNN runs
# them fused is decided when they run). Stage 1 begins with a block whose shortcut is its
# input, stage 2 with a downsampling one: one stage takes over its input. The first
# convolution of each of the nine blocks writes into a workspace slot.
@pytest.mark.parametrize(
    "switch, field, expected",
    [
        ("--unfused", "fused_convolutions", [19, 0]),
        ("--unchained", "stages_taking_their_input", [1, 0]),
        ("--no-workspace", "workspace_convolutions", [9, 0]),
    ],
)
def test_fresh_a_b_switches_turn_their_rewrite_off(script, tmp_path, switch, field, expected):
    fresh = script("fresh")
    argv = ["--model", "resnet20", "--n-exits", "2", "--batch-size", "4", "--threads", "1"]
    argv += ["--runs", "1", "--calls", "1", "--methods", "no_exit"]
    counts = []
    for extra in ([], [switch]):
        saved = tmp_path / f"fresh{len(extra)}.json"
        assert fresh.main([*argv, *extra, "--json", str(saved)]) == 0
        (run,) = json.loads(saved.read_text())["runs"]
        counts.append(run[field])
    assert counts == expected


def test_overhead_splits_the_no_exit_pass_into_its_parts(script, tmp_path, capsys):
    overhead = script("overhead")
    saved = tmp_path / "overhead.json"
    argv = ["--model", "resnet20", "--n-exits", "2", "--batch-size", "4", "--threads", "1"]
    assert overhead.main([*argv, "--rounds", "2", "--json", str(saved)]) == 0
    printed = capsys.readouterr().out
    alone = ("heads_alone", "heads_alone_as_written")
    for method in (*overhead.METHODS, *alone):
        assert method in printed
    result = json.loads(saved.read_text())
    assert set(result["ms_per_sample"]) == {*overhead.METHODS, *alone}
    assert all(v > 0 for v in result["ms_per_sample"].values())
    assert all(len(t) == 2 for t in result["seconds_per_round"].values())


def test_overhead_pieces_compute_what_early_exit_computes(script):
    overhead = script("overhead")
    speed_args = ["--model", "resnet20", "--n-exits", "2"]
    net = overhead.speed.create_net(
        overhead.speed.build_parser().parse_args(speed_args), torch.device("cpu")
    )
    x = torch.randn(3, *net.input_size)
    before = x.clone()
    with torch.inference_mode():
        calls = overhead.pieces(net, x)
        expected = net.early_exit(x, threshold=overhead.NEVER).logits
        for method in ("stages_alone", "stages", "stages_heads", "stages_heads_as_written"):
            assert torch.equal(calls[method](), expected), method
        torch.testing.assert_close(calls["original"](), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(x, before)  # no piece writes into the input


def test_fresh_time_ideal_weighs_each_stage_by_the_samples_that_reach_it(script, monkeypatch):
    fresh = script("fresh")
    net = earlyexit.convert(timm.create_model("resnet20"), n_exits=2, dist="linear")
    net.eval()
    batches = [torch.randn(4, *net.input_size)]
    # Each piece's fake duration on the batch of 4: stage i takes 4 (i + 1) s, head i 40 s.
    pieces = {f"stage:{i}": i + 1.0 for i in range(3)} | {f"head:{i}": 10.0 for i in range(2)}
    fake = {name: (lambda name=name: name) for name in pieces}
    monkeypatch.setattr(fresh.speed, "full_batch_pieces", lambda *a: fake)
    monkeypatch.setattr(fresh.speed, "timed", lambda call, threads, device: 4 * pieces[call()])
    args = fresh.build_parser().parse_args(["--calls", "2"])
    ideal = fresh.time_ideal_ms(net, batches, [2, 1, 1], args, None)
    # r = (1, 1/2, 1/4): (1 + 10) + (2 + 10) / 2 + 3 / 4, per sample of the batch of 4, in ms
    assert ideal == pytest.approx(1e3 * (11 + 6 + 0.75))


def test_recipe_plot_lays_out_many_settings_in_rows(script, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    recipe = script("recipe")
    records = [
        recipe.Record(
            setting=f"s{i}",
            variant="loss=exits,head=conv",
            seed=0,
            plain_accuracy=0.9,
            exit_accuracy=[0.8, 0.9],
            exit_costs=[0.5, 1.0],
            default={"accuracy": 0.9, "cost": 0.7},
            best={},
            curves={"learned": [[0.5, 0.8], [1.0, 0.9]]},
        )
        for i in range(recipe.PLOT_COLUMNS + 1)
    ]
    shapes = []
    import matplotlib.pyplot as plt

    subplots = plt.subplots
    monkeypatch.setattr(
        plt, "subplots", lambda r, c, **kw: shapes.append((r, c)) or subplots(r, c, **kw)
    )
    png = tmp_path / "recipe.png"
    recipe.plot(records, str(png))
    assert png.stat().st_size > 0
    assert shapes == [(2, recipe.PLOT_COLUMNS)]  # five panels: a second row, not one long strip


def _gpu_check(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`benchmarks/gpu_check.sh` run from the repository root with this Python."""
    environ = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path / "out"), **env}
    return subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_check.sh"), *args],
        cwd=BENCHMARKS.parent,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the preflight's stop without CUDA")
def test_gpu_check_preflight_stops_before_the_gpu_steps(tmp_path):
    done = _gpu_check(tmp_path)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "converted resnet20: 2 exits" in done.stdout  # the project and fvcore import
    assert "No CUDA device is visible" in done.stderr
    assert "preflight failed: nothing else was run" in done.stdout
    assert not (tmp_path / "out" / "pytest-gpu.txt").exists()
    # A dependency that does not import stops it with a hint, before the CUDA check.
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['fvcore'] = None\n")
    done = _gpu_check(tmp_path, PYTHONPATH=str(hide))
    assert done.returncode == 3
    assert "does not import" in done.stderr and "--prepare wheels" in done.stderr
    assert "No CUDA device" not in done.stderr
    # Without a test dependency it stops when the tests step is to run, and only then.
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['hypothesis'] = None\n")
    done = _gpu_check(tmp_path, PYTHONPATH=str(hide))
    assert done.returncode == 3
    assert "tests step needs pytest, hypothesis" in done.stderr and "STEPS=" in done.stderr
    done = _gpu_check(tmp_path, PYTHONPATH=str(hide), STEPS="preset sweep")
    assert done.returncode == 3
    assert "No CUDA device is visible" in done.stderr and "tests step" not in done.stderr


def _wheel(folder: Path, name: str, version: str) -> None:
    """A minimal pure-Python wheel of package `name`: one module that holds nothing."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": "",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


def test_gpu_check_installs_only_the_wheels_of_missing_packages(tmp_path):
    # A wheel of a package the Python has (here: pytest) stays out, so that the machine's own
    # pytest and its plugins keep working; the wheel of a missing package goes in.
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "pytest", "0.0.1")  # an empty module: installed, it would hide pytest
    _wheel(wheels, "earlyexit_probe_missing", "0.1")
    done = _gpu_check(tmp_path, WHEELS=str(wheels), DEVICE="cpu", STEPS="tests", BUDGET="0")
    assert "installing 1 of the wheels" in done.stdout, done.stdout + done.stderr
    assert "pytest" in done.stdout and "device cpu" in done.stdout  # the preflight imported it
    assert done.returncode == 124  # no budget left for the step itself
    assert "== tests: not run" in done.stdout


def test_gpu_check_steps_run_in_order_each_within_its_limit(tmp_path):
    # DEVICE=cpu runs the GPU machine's steps here: a step past its limit is stopped and the
    # next one still runs; the exit status says a benchmark did not finish.
    done = _gpu_check(tmp_path, DEVICE="cpu", STEPS="sweep tests", LIMIT_SWEEP="10")
    assert done.returncode == 124, done.stdout + done.stderr
    assert "device cpu" in done.stdout
    assert "== sweep: stopped at its limit of 10 s" in done.stdout
    assert done.stdout.index("== sweep (at most 10 s)") < done.stdout.index("== tests")
    assert "sweep exit-124" in done.stdout and "tests exit-0" in done.stdout
    assert "skipped" in (tmp_path / "out" / "pytest-gpu.txt").read_text()  # no CUDA here
    assert not list((tmp_path / "out").glob("*.json"))  # the stopped sweep wrote nothing
    # No budget left after the preflight: nothing runs, and that is not a success.
    done = _gpu_check(tmp_path, DEVICE="cpu", STEPS="preset", BUDGET="0")
    assert done.returncode == 124
    assert "== preset: not run" in done.stdout
    # A step that does not exist stops it before anything runs.
    done = _gpu_check(tmp_path, STEPS="tests bench")
    assert done.returncode == 2
    assert "Unknown step 'bench'" in done.stderr and "preflight" not in done.stdout
