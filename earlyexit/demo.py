"""`earlyexit demo`: the paper's Table 2 experiment, small enough to run anywhere.

Trains the paper's EENet-8 (`resnet8`, two quadratically placed exits) with each of the
paper's four losses on the paper's pool exits, and with the library's defaults (`convert`'s
exit type and `EENetLoss()`), beside the plain ResNet-8, then prints the paper's Table 2
layout and plots accuracy against cost over thresholds.

With no arguments it needs no download: scikit-learn's bundled 8×8 digits, upsampled to
28×28, with a fixed seeded split; `--dataset mnist --data-dir DIR` runs it on MNIST.

    earlyexit demo                                   # about a minute on two CPU cores
    earlyexit demo --dataset mnist --data-dir data --epochs 2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from earlyexit.calibrate import TradeoffCurve
from earlyexit.evaluation import Evaluation, ExitCache, collect_exit_cache
from earlyexit.inference import check_threshold
from earlyexit.loss import DEFAULT_VERSION, EENetLoss
from earlyexit.model import EarlyExitNet, convert
from earlyexit.training import train_one_epoch

__all__ = [
    "DemoRow",
    "add_demo_arguments",
    "format_table",
    "load_digits_data",
    "load_mnist_data",
    "plot_demo_tradeoff",
    "run_demo",
    "tradeoff",
]

#: The rows of the demo, in the paper's order: (label, loss version, exit type). The plain
#: model trains with cross-entropy (version None); the last row is the library's defaults
#: (exit type None: `convert`'s default).
LOSSES: tuple[tuple[str, str | None, str | None], ...] = (
    ("ResNet-8", None, None),
    ("EENet-8 mc", "mc", "pool"),
    ("EENet-8 cost", "cost", "pool"),
    ("EENet-8 v1", "v1", "pool"),
    ("EENet-8 v2", "v2", "pool"),
    ("EENet-8 library defaults", DEFAULT_VERSION, None),
)

#: Default epochs, Adam learning rates (the starting rate, annealed to 0 by a cosine) and batch
#: sizes per data set: about a minute on two CPU cores for digits, where 1e-3 (the paper's
#: rate) would need many more of its 42 steps per epoch, and where 8 epochs of 64-sample
#: batches leave even the final exit 5-10 points short.
DEFAULT_EPOCHS = {"digits": 16, "mnist": 2}
DEFAULT_LR = {"digits": 1e-2, "mnist": 1e-3}
DEFAULT_BATCH_SIZE = {"digits": 32, "mnist": 64}

#: Thresholds of the accuracy-cost curve; above 1 means no early exit.
THRESHOLDS: tuple[float, ...] = (*(i / 20 for i in range(21)), 1.01)


@dataclass
class DemoRow:
    """One model's line of the table.

    Attributes:
        label: the row's name.
        evaluation: early-exit results at the net's threshold; None for the plain model.
        accuracy: test accuracy (of early-exit inference for an EENet).
        cost: mean relative cost (1.0 for the plain model).
        curve: `(threshold, accuracy, cost)` points, for EENets.
        seconds: training time.
    """

    label: str
    evaluation: Evaluation | None
    accuracy: float
    cost: float
    curve: list[tuple[float, float, float]] = field(default_factory=list)
    seconds: float = 0.0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to an argument parser (the `earlyexit demo` command's)."""
    parser.add_argument(
        "--dataset",
        choices=("digits", "mnist"),
        default="digits",
        help="digits: scikit-learn's bundled 8x8 digits upsampled to 28x28 (no download); "
        "mnist: MNIST in torchvision's layout under --data-dir (default digits)",
    )
    parser.add_argument(
        "--data-dir",
        default="data",
        help="folder holding MNIST/raw, for --dataset mnist (default ./data)",
    )
    _add_per_dataset_option(
        parser,
        "--epochs",
        int,
        DEFAULT_EPOCHS,
        "training epochs per model (default {}; the paper trains 20 on MNIST)",
    )
    parser.add_argument("--lam", type=float, default=1.0, help="λ of the losses (default 1.0)")
    _add_per_dataset_option(
        parser,
        "--lr",
        float,
        DEFAULT_LR,
        "Adam's starting learning rate, annealed to 0 by a cosine (default {})",
    )
    _add_per_dataset_option(
        parser, "--batch-size", int, DEFAULT_BATCH_SIZE, "training batch size (default {})"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of data split and init (0)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch; the model is tiny, so one is fastest (default 1)",
    )
    parser.add_argument(
        "--out", default="earlyexit-demo", help="folder for the plot (default ./earlyexit-demo)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="with --dataset mnist: never download, use only what --data-dir holds",
    )


def _add_per_dataset_option(
    parser: argparse.ArgumentParser,
    flag: str,
    kind: type,
    defaults: dict[str, float],
    text: str,
) -> None:
    """Add an option whose default depends on `--dataset`: None here, `defaults` in `run_demo`.

    The `{}` in `text` becomes the defaults, as in `8 for digits, 2 for mnist`.
    """
    per_dataset = ", ".join(f"{value:g} for {name}" for name, value in defaults.items())
    parser.add_argument(flag, type=kind, default=None, help=text.format(per_dataset))


def load_digits_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 8×8 digits, upsampled to 1×28×28, split 75/25 stratified.

    Args:
        seed: seed of the split.

    Returns:
        `(train, test)` datasets of normalized images and class indices.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        range(len(labels)), test_size=0.25, random_state=seed, stratify=digits.target
    )
    train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = (images - mean) / std
    return (
        TensorDataset(images[train_idx], labels[train_idx]),
        TensorDataset(images[test_idx], labels[test_idx]),
    )


def load_mnist_data(
    data_dir: str | Path, download: bool = False
) -> tuple[TensorDataset, TensorDataset]:
    """MNIST from torchvision's layout (`data_dir/MNIST/raw`), as in-memory tensors.

    Args:
        data_dir: the folder that holds (or will hold) `MNIST/`.
        download: fetch MNIST with torchvision when it is not there; files already there
            are used as they are, without a network.

    Returns:
        `(train, test)` datasets of normalized `(1, 28, 28)` images and class indices.

    Raises:
        FileNotFoundError: MNIST is not there and could not be (or was not to be) downloaded.
    """
    from torchvision.datasets import MNIST

    from earlyexit.models.mnist_resnet import MNIST_MEAN, MNIST_STD

    def load(train: bool) -> TensorDataset:
        try:
            ds = MNIST(str(data_dir), train=train, download=download)
        except (RuntimeError, OSError) as err:  # not there, or no network to fetch it
            raise FileNotFoundError(
                f"MNIST was not found under {str(data_dir)!r}"
                + (" and could not be downloaded" if download else "")
                + ". Hint: pass --data-dir, the folder that holds MNIST/raw (torchvision's "
                "layout), or run once where there is a network."
            ) from err
        x = ds.data.float().div(255.0).sub(MNIST_MEAN[0]).div(MNIST_STD[0]).unsqueeze(1)
        return TensorDataset(x, ds.targets.long())

    return load(True), load(False)


def tradeoff(
    net: EarlyExitNet,
    loader: DataLoader,
    thresholds: tuple[float, ...] = THRESHOLDS,
    device: torch.device | str = "cpu",
) -> list[tuple[float, float, float]]:
    """Accuracy and mean cost at each threshold, from one `forward_all` pass.

    The library's evaluator (`earlyexit.evaluation.collect_exit_cache`), as a list of points.

    Returns:
        `(threshold, accuracy, cost)` for each threshold.
    """
    cache = collect_exit_cache(net, loader, device=device, progress=False)
    return _curve_points(cache, thresholds)


def _curve_points(
    cache: ExitCache, thresholds: tuple[float, ...] = THRESHOLDS
) -> list[tuple[float, float, float]]:
    curve = TradeoffCurve.from_cache(cache, [check_threshold(t) for t in thresholds])
    return list(zip(curve.thresholds, curve.accuracy, curve.mean_cost, strict=True))


def _pct(value: float) -> str:
    return f"{100 * value:.2f}"


def format_table(rows: list[DemoRow], exit_costs: list[float], title: str = "") -> str:
    """The paper's Table 2 layout, with each exit's own accuracy beside where samples leave.

    Args:
        rows: one per model; a row without `evaluation` (the plain model) shows `-` at the
            early exits.
        exit_costs: the N+1 relative costs, for the header.
        title: a line above the table.

    Returns:
        The table as text.
    """
    n = len(exit_costs)
    names = [f"EE-{i}" for i in range(n - 1)] + ["last"]
    width = max(len(r.label) for r in rows) + 2
    head1 = (
        f"{'':<{width}}"
        + f"{'# samples that exit':^{8 * n}}"
        + f"{'own accuracy of exit (%)':^{8 * n}}"
        + f"{'accuracy':>10}{'rel. cost':>11}"
    )
    head2 = (
        f"{'model':<{width}}"
        + "".join(f"{s:>8}" for s in names)
        + "".join(f"{s:>8}" for s in names)
        + f"{'(%)':>10}{'':>11}"
    )
    costs = ", ".join(f"{name} {c:.2f}" for name, c in zip(names, exit_costs, strict=True))
    lines = [title] if title else []
    lines += [f"relative cost at each exit: {costs}", head1, head2, "-" * len(head2)]
    for r in rows:
        ev = r.evaluation
        if ev is None:
            counts = ["-"] * (n - 1) + ["all"]
            own = ["-"] * (n - 1) + [_pct(r.accuracy)]
        else:
            counts = [str(c) for c in ev.exit_counts]
            own = [_pct(a) for a in ev.exit_accuracy]
        lines.append(
            f"{r.label:<{width}}"
            + "".join(f"{s:>8}" for s in counts)
            + "".join(f"{s:>8}" for s in own)
            + f"{_pct(r.accuracy):>10}{r.cost:>11.2f}"
        )
    return "\n".join(lines)


def plot_demo_tradeoff(rows: list[DemoRow], path: Path, title: str) -> Path:
    """Save accuracy against mean relative cost, one curve per EENet, the plain model a star.

    One figure for all the demo's models; `earlyexit.plot_tradeoff` draws one net's curve.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in rows:
        if r.evaluation is None:
            ax.scatter([r.cost], [100 * r.accuracy], marker="*", s=160, c="k", label=r.label)
            continue
        _, acc, cost = zip(*r.curve, strict=True)
        (line,) = ax.plot(cost, [100 * a for a in acc], marker=".", label=r.label)
        ax.scatter(
            [r.cost], [100 * r.accuracy], s=60, facecolors="none", edgecolors=line.get_color()
        )
    ax.set_xlabel("mean relative cost (1.0 = plain ResNet-8)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title + "\n(thresholds 0 to 1; circles: T = 0.5)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _train(
    label: str,
    version: str | None,
    exit_type: str | None,
    data: tuple[TensorDataset, TensorDataset],
    args: argparse.Namespace,
    epochs: int,
    lr: float,
    batch_size: int,
) -> tuple[DemoRow, list[float]]:
    import timm

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = timm.create_model("resnet8", width=4).to(device)
    net: nn.Module = model
    criterion: nn.Module = nn.CrossEntropyLoss()
    if version is not None:
        options = {"exit_type": exit_type} if exit_type else {}
        net = convert(model, n_exits=2, dist="quadratic", **options)
        criterion = EENetLoss(lam=args.lam, version=version)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    # Annealed to 0 over the epochs (cosine): at a constant rate the weights a run ends on are
    # a noisy draw (the plain ResNet-8 on digits ended anywhere in 90-99 % over seeds).
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(args.seed)
    train = DataLoader(data[0], batch_size=batch_size, shuffle=True, generator=generator)
    test = DataLoader(data[1], batch_size=500)
    start = time.perf_counter()
    # No bars where nobody watches them (a log file, CI): they would flood it.
    progress = not args.no_progress and sys.stderr.isatty()
    for epoch in range(epochs):
        train_one_epoch(net, train, criterion, optimizer, device, epoch, progress=progress)
        schedule.step()
    seconds = time.perf_counter() - start
    if isinstance(net, EarlyExitNet):
        cache = collect_exit_cache(net, test, device=device, progress=False)
        ev = Evaluation.from_cache(cache, net.threshold)
        row = DemoRow(label, ev, ev.accuracy, ev.cost, _curve_points(cache), seconds)
        return row, ev.exit_costs
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x.to(device)).argmax(1) == y.to(device)).sum()) for x, y in test)
    return DemoRow(label, None, correct / len(data[1]), 1.0, seconds=seconds), []


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo with parsed arguments (see `add_demo_arguments`); returns an exit status.

    Prints the table, the plot's path and the time taken; writes `tradeoff.png` to `args.out`.
    """

    def per_dataset(value, defaults):  # an option left out takes the data set's default
        return value if value is not None else defaults[args.dataset]

    epochs = per_dataset(args.epochs, DEFAULT_EPOCHS)
    lr = per_dataset(args.lr, DEFAULT_LR)
    batch_size = per_dataset(args.batch_size, DEFAULT_BATCH_SIZE)
    if epochs < 1:
        print(f"error: --epochs must be at least 1, got {epochs}", file=sys.stderr)
        return 2
    if batch_size < 1:
        print(f"error: --batch-size must be at least 1, got {batch_size}", file=sys.stderr)
        return 2
    if not (math.isfinite(args.lam) and args.lam >= 0):
        print(f"error: --lam must be a non-negative number, got {args.lam}", file=sys.stderr)
        return 2
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        if args.dataset == "digits":
            data = load_digits_data(args.seed)
            what = "scikit-learn digits (8x8 upsampled to 28x28)"
        else:
            try:
                data = load_mnist_data(args.data_dir, download=not args.no_download)
            except FileNotFoundError as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            what = "MNIST"
        print(
            f"EENet-8 (resnet8 width 4, 2 quadratic exits) on {what}: "
            f"{len(data[0])} train / {len(data[1])} test, {epochs} epochs, "
            f"Adam lr {lr:g} (cosine), "
            f"batch {batch_size}, λ={args.lam}, seed {args.seed}",
            flush=True,
        )
        rows: list[DemoRow] = []
        row_costs: list[list[float]] = []
        for label, version, exit_type in LOSSES:
            row, costs = _train(label, version, exit_type, data, args, epochs, lr, batch_size)
            row_costs.append(costs)
            rows.append(row)
            print(
                f"  {label:<28} accuracy {_pct(row.accuracy):>6}%  cost {row.cost:.2f}  "
                f"({row.seconds:.1f} s)",
                flush=True,
            )
        title = f"Table 2 layout: {what}, {epochs} epochs, λ={args.lam}, threshold 0.5"
        print()
        # The header shows the paper's pool exits; the defaults' exits cost a little more.
        exit_costs = next(c for c in row_costs if c)
        print(format_table(rows, exit_costs, title))
        if row_costs[-1] != exit_costs:
            costs = ", ".join(f"{c:.2f}" for c in row_costs[-1])
            print(f"the library defaults' exits (with their heads) cost {costs}")
        path = plot_demo_tradeoff(rows, Path(args.out) / "tradeoff.png", f"EENet-8 on {what}")
        print(f"\naccuracy vs cost plot written to {path.resolve()}")
        print(f"total time {time.perf_counter() - start:.1f} s")
    finally:
        torch.set_num_threads(threads)
    return 0
