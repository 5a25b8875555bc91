"""The benchmark scripts' bookkeeping: what they keep, merge and draw (no timing is asserted)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

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
