"""`earlyexit demo`: trains, prints the Table 2 layout and writes the plot."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import pytest

import earlyexit.demo
from earlyexit import cli
from earlyexit.demo import LOSSES, DemoRow, add_demo_arguments, format_table, run_demo
from earlyexit.training import Evaluation


def demo_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_prints_table_2_and_writes_the_plot(tmp_path, capsys):
    args = demo_args(
        "--epochs", "1", "--batch-size", "256", "--out", str(tmp_path), "--no-progress"
    )
    assert run_demo(args) == 0
    out = capsys.readouterr().out
    table = out[out.index("Table 2 layout") :]
    lines = table.splitlines()
    assert "relative cost at each exit: EE-0 0.42, EE-1 0.71, last 1.00" in table
    assert lines[3].split()[:7] == ["model", "EE-0", "EE-1", "last", "EE-0", "EE-1", "last"]
    rows = {label: line for label, *_ in LOSSES for line in lines if line.startswith(label + " ")}
    assert list(rows) == [label for label, *_ in LOSSES]
    plain = rows["ResNet-8"].split()
    assert plain[1:4] == ["-", "-", "all"] and plain[-1] == "1.00"
    for label, *_ in LOSSES[1:]:
        fields = rows[label][len(label) :].split()
        counts = [int(c) for c in fields[:3]]
        assert sum(counts) == 450  # the digits test split
        assert all(0.0 <= float(a) <= 100.0 for a in fields[3:7])
        assert 0.4 <= float(fields[-1]) <= 1.05  # the default heads cost a little

    png = tmp_path / "tradeoff.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in out


@pytest.fixture
def two_rows(monkeypatch):
    """The plain model and one EENet: the demo's whole path, in a fraction of the time."""
    monkeypatch.setattr(earlyexit.demo, "LOSSES", (LOSSES[0], LOSSES[-1]))


def test_demo_writes_the_plot_to_out_and_prints_its_absolute_path(
    tmp_path, monkeypatch, capsys, two_rows
):
    monkeypatch.chdir(tmp_path)
    args = demo_args("--epochs", "1", "--batch-size", "256", "--out", "plots/run1")
    assert run_demo(args) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if "plot written to" in ln)
    printed = Path(line.split("plot written to ", 1)[1])
    assert printed.is_absolute() and printed.is_file()
    assert printed == (tmp_path / "plots" / "run1" / "tradeoff.png").resolve()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("terminal", "flags", "expected"),
    [(False, [], False), (True, [], True), (True, ["--no-progress"], False)],
    ids=["piped", "terminal", "terminal_no_progress"],
)
def test_progress_bars_only_on_a_terminal(
    tmp_path, monkeypatch, two_rows, terminal, flags, expected
):
    shown = []

    def train_one_epoch(*args, progress, **kwargs):
        shown.append(progress)
        return 1.0

    monkeypatch.setattr(earlyexit.demo, "train_one_epoch", train_one_epoch)
    monkeypatch.setattr(sys, "stderr", _Terminal() if terminal else io.StringIO())
    assert sys.stderr.isatty() is terminal
    assert run_demo(demo_args("--epochs", "1", "--out", str(tmp_path), *flags)) == 0
    assert shown and set(shown) == {expected}


def test_cli_runs_the_demo_and_reports_missing_mnist(tmp_path, capsys):
    argv = ["demo", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"]
    code = cli.main([*argv, "--no-download"])
    assert code == 2
    err = capsys.readouterr().err
    assert "MNIST was not found" in err and "--data-dir" in err
    assert "downloaded" not in err


def test_demo_tries_to_download_mnist_and_says_when_it_cannot(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    opened = []

    def offline(request, *args, **kwargs):  # no network, as on a machine without access
        opened.append(request)
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    code = cli.main(["demo", "--dataset", "mnist", "--data-dir", str(tmp_path), "--no-progress"])
    assert code == 2 and opened
    err = capsys.readouterr().err.strip()
    assert "MNIST was not found" in err and "could not be downloaded" in err
    assert len(err.splitlines()) == 1


def test_demo_rejects_bad_options(capsys):
    assert run_demo(demo_args("--epochs", "0")) == 2
    assert "--epochs" in capsys.readouterr().err
    assert run_demo(demo_args("--batch-size", "0")) == 2
    assert "--batch-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_args("--dataset", "cifar")


def test_format_table_layout():
    ev = Evaluation(
        accuracy=0.9,
        cost=0.8,
        exit_counts=[1, 2, 7],
        exit_accuracy=[0.3, 0.6, 0.95],
        exit_costs=[0.25, 0.5, 1.0],
        num_samples=10,
        threshold=0.5,
    )
    rows = [DemoRow("plain", None, 0.97, 1.0), DemoRow("eenet", ev, 0.9, 0.8)]
    text = format_table(rows, ev.exit_costs, "title")
    lines = text.splitlines()
    assert lines[0] == "title"
    assert lines[1] == "relative cost at each exit: EE-0 0.25, EE-1 0.50, last 1.00"
    assert lines[-2].split() == ["plain", "-", "-", "all", "-", "-", "97.00", "97.00", "1.00"]
    assert lines[-1].split() == ["eenet", "1", "2", "7", "30.00", "60.00", "95.00", "90.00", "0.80"]
