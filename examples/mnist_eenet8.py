r"""Reproduce the EENets paper's MNIST experiments (Demir & Akbas, §4.2, Tables 2 and 3).

EENet-8 is the paper's 8-layer ResNet (`resnet8`, 4 channels wide) with two pool exits placed
by the quadratic rule. Two experiments:

- **Table 2**: the plain ResNet-8 against EENet-8 trained with each of the paper's losses
  (L_MC, L_Cost, L_v1, L_v2, all with λ = 1) and with the library's default loss: how many test
  samples leave at each exit, each exit's own accuracy, overall accuracy and relative cost.
- **Table 3**: the λ sweep, accuracy and cost against the weight λ of the cost terms (with the
  library's default loss unless `--sweep-version` says otherwise; `v2` is the paper's).

As in the paper: Adam with learning rate 1e-3, threshold T = 0.5, test results of the last epoch.
The paper trains 20 epochs with batch 32; the defaults here (2 epochs, batch 64) take about
75 s of CPU per model, 12 CPU-minutes for all nine. MNIST is downloaded with torchvision into
`--data-dir` (default `./data`, torchvision's layout `DATA_DIR/MNIST/raw/`) the first time;
once the files are there the script runs offline (`--no-download` never downloads).

Usage (from the repository root)::

    python examples/mnist_eenet8.py --epochs 2 \
        --lams 1.25 1.5 2 --jobs 4 --json mnist.json --plot mnist.png

`--rows` picks Table 2's rows (`plain mc cost v1 v2 default`), `--lams` the sweep's λ values
(none: no sweep), `--exit-type` the exit blocks (`pool` is the paper's), `--jobs` how many
models train at once in worker processes (each on `--threads` threads). The script prints a
progress bar per epoch (with `--jobs 1`) and both tables at the end; `--json` also writes every
number, with the accuracy-cost curve over thresholds, to a file. Our results are in
docs/reproduction/mnist.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import _distributed as ddp
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader

import earlyexit
from earlyexit.demo import DemoRow, format_table, load_mnist_data, plot_demo_tradeoff, tradeoff
from earlyexit.loss import DEFAULT_VERSION
from earlyexit.training import evaluate, train_one_epoch

#: Table 2's rows: (label, loss version or None for the plain ResNet-8 with cross-entropy).
TABLE2 = {
    "plain": ("ResNet-8", None),
    "mc": ("EENet-8 mc", "mc"),
    "cost": ("EENet-8 cost", "cost"),
    "v1": ("EENet-8 v1", "v1"),
    "v2": ("EENet-8 v2", "v2"),
    "default": (f"EENet-8 {DEFAULT_VERSION}", DEFAULT_VERSION),
}

#: MNIST's files under `--data-dir`, torchvision's layout.
MNIST_FILES = [
    f"MNIST/raw/{name}-ubyte"
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
]

#: The paper's numbers (20 epochs), for the side-by-side in docs/reproduction/mnist.md.
PAPER_TABLE2 = {
    "ResNet-8": (None, None, 10000, 97.38, 1.00),
    "EENet-8 mc": (0, 0, 10000, 97.42, 1.00),
    "EENet-8 cost": (10000, 0, 0, 10.32, 0.08),
    "EENet-8 v1": (6614, 3386, 0, 54.05, 0.14),
    "EENet-8 v2": (47, 2247, 7706, 96.55, 0.82),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="The paper's setting is --epochs 20 --batch-size 32.",
    )
    parser.add_argument(
        "--data-dir", default="data", help="folder for MNIST/raw, downloaded there (./data)"
    )
    ddp.add_download_argument(parser)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per model (paper: 20)")
    parser.add_argument(
        "--lams",
        type=float,
        nargs="*",
        default=[1.25, 1.5, 2.0],
        help="λ values of the sweep (default 1.25 1.5 2; none skips the sweep)",
    )
    parser.add_argument(
        "--sweep-version",
        default=DEFAULT_VERSION,
        choices=earlyexit.EENetLoss.versions,
        help=f"loss of the λ sweep (default {DEFAULT_VERSION}; the paper's is v2)",
    )
    parser.add_argument(
        "--rows",
        nargs="*",
        choices=list(TABLE2),
        default=list(TABLE2),
        help="Table 2 rows to train (default all: plain mc cost v1 v2 default; none skips it)",
    )
    parser.add_argument(
        "--exit-type",
        default="pool",
        choices=("plain", "pool", "bnpool", "conv"),
        help="exit blocks (default pool, the paper's Table 2 setting; conv is the library's)",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (paper: 32)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (1e-3)")
    parser.add_argument("--width", type=int, default=4, help="channels of resnet8's stem (4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of init and shuffling (0)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; the model is tiny (1)"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="models trained at once, in worker processes (1); 2 on an idle 2-core machine",
    )
    parser.add_argument("--json", type=Path, default=None, help="write all results here")
    parser.add_argument(
        "--plot", type=Path, default=None, help="write an accuracy-vs-cost PNG here"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser.parse_args(argv)


def train(label, version, lam, data, args) -> DemoRow:
    """Train one model from the same seed and evaluate it on the test set at T = 0.5."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = timm.create_model("resnet8", width=args.width).to(device)
    if version is None:
        net, criterion = model, nn.CrossEntropyLoss()
    else:
        net = earlyexit.convert(model, n_exits=2, dist="quadratic", exit_type=args.exit_type)
        criterion = earlyexit.EENetLoss(lam=lam, version=version)
    optimizer = torch.optim.Adam(net.parameters(), lr=args.lr)
    shuffle = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(data[0], args.batch_size, shuffle=True, generator=shuffle)
    test_loader = DataLoader(data[1], batch_size=1000)
    start, loss = time.perf_counter(), float("nan")
    for epoch in range(args.epochs):
        loss = train_one_epoch(
            net, train_loader, criterion, optimizer, device, epoch, not args.no_progress
        )
    seconds = time.perf_counter() - start
    if version is None:
        model.eval()
        with torch.no_grad():
            hits = sum(
                int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in test_loader
            )
        row = DemoRow(label, None, hits / len(data[1]), 1.0, seconds=seconds)
    else:
        ev = evaluate(net, test_loader, device=device, progress=False)
        row = DemoRow(
            label, ev, ev.accuracy, ev.cost, tradeoff(net, test_loader, device=device), seconds
        )
    print(
        f"{label:<32} last-epoch loss {loss:.4f}  accuracy {100 * row.accuracy:.2f}%  "
        f"cost {row.cost:.3f}  ({seconds:.0f} s)",
        flush=True,
    )
    return row


_DATA = None


def fetch_mnist(data_dir: str | Path, download: bool = True):
    """MNIST's `(train, test)` tensors from `data_dir`, downloaded there when missing."""
    from torchvision.datasets import MNIST

    root = Path(data_dir).expanduser()

    def build(download: bool):
        if download:
            MNIST(root, train=True, download=True)  # fetches both splits; skips files there
        return load_mnist_data(root)

    return ddp.fetch_dataset("MNIST", root, build, MNIST_FILES, download, fake_data=False)


def _init_worker(data_dir: str, threads: int) -> None:
    global _DATA
    torch.set_num_threads(threads)
    _DATA = load_mnist_data(data_dir)


def _train_in_worker(label, version, lam, args) -> DemoRow:
    return train(label, version, lam, _DATA, args)


def train_all(jobs: list[tuple[str, str | None, float]], data, args) -> list[DemoRow]:
    """Train every (label, version, λ), `args.jobs` at a time."""
    if args.jobs <= 1:
        return [train(label, version, lam, data, args) for label, version, lam in jobs]
    args.no_progress = True  # bars from several processes would interleave
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(
        args.jobs, context, initializer=_init_worker, initargs=(args.data_dir, args.threads)
    ) as pool:
        futures = [pool.submit(_train_in_worker, *job, args) for job in jobs]
        return [f.result() for f in futures]


def sweep_table(rows: list[tuple[float, DemoRow]]) -> str:
    """The λ sweep in Table 3's layout."""
    lines = [
        f"{'λ':>6} {'accuracy (%)':>13} {'rel. cost':>10} {'EE-0':>7} {'EE-1':>7} "
        f"{'last':>7}   own acc of exits (%)"
    ]
    for lam, r in rows:
        ev = r.evaluation
        own = " / ".join(f"{100 * a:.1f}" for a in ev.exit_accuracy)
        counts = "".join(f"{c:>8d}" for c in ev.exit_counts)
        lines.append(f"{lam:>6g} {100 * r.accuracy:>13.2f} {r.cost:>10.3f}{counts}   {own}")
    return "\n".join(lines)


def as_dict(r: DemoRow) -> dict:
    ev = r.evaluation
    return {
        "label": r.label,
        "accuracy": r.accuracy,
        "cost": r.cost,
        "exit_counts": ev.exit_counts if ev else None,
        "exit_accuracy": ev.exit_accuracy if ev else None,
        "exit_costs": ev.exit_costs if ev else None,
        "curve": [{"threshold": t, "accuracy": a, "cost": c} for t, a, c in r.curve],
        "train_seconds": r.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    data = fetch_mnist(args.data_dir, args.download)
    start = time.perf_counter()
    setting = (
        f"{args.epochs} epochs, batch {args.batch_size}, Adam lr {args.lr}, "
        f"resnet8 width {args.width}, {args.exit_type} exits, seed {args.seed}"
    )
    print(f"MNIST: {len(data[0])} train / {len(data[1])} test; {setting}", flush=True)

    jobs = [(*TABLE2[key], 1.0) for key in args.rows]
    jobs += [(f"{args.sweep_version} λ={lam:g}", args.sweep_version, lam) for lam in args.lams]
    rows = train_all(jobs, data, args)
    table2 = rows[: len(rows) - len(args.lams)]
    sweep = list(zip(args.lams, rows[len(table2) :], strict=True))

    exit_costs = next(
        (r.evaluation.exit_costs for r in table2 + [r for _, r in sweep] if r.evaluation), []
    )
    print(f"\ntotal time {time.perf_counter() - start:.0f} s ({setting})")
    if table2:
        print()
        print(format_table(table2, exit_costs, "Table 2 (λ = 1, T = 0.5)"))
    if sweep:
        print(f"\nTable 3: λ sweep of {args.sweep_version} (T = 0.5)")
        print(sweep_table(sweep))
    if args.plot:
        plot_demo_tradeoff(table2 + [r for _, r in sweep], args.plot, "EENet-8 on MNIST")
        print(f"plot: {args.plot}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "setting": {
                        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                    },
                    "machine": f"{platform.machine()} {platform.processor()}, "
                    f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
                    "exit_costs": exit_costs,
                    "table2": [as_dict(r) for r in table2],
                    "sweep": [{"lam": lam, **as_dict(r)} for lam, r in sweep],
                    "seconds": time.perf_counter() - start,
                },
                indent=1,
            )
        )
        print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
