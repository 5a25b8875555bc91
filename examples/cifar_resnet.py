"""Train a 6n+2 ResNet EENet on CIFAR-10 or SVHN with the paper's recipe (Tables 7–9).

Demir & Akbas, §4: SGD with momentum 0.9, a global batch of 256, learning rate 0.1 divided
by 10 every 100 epochs, weight decay 1e-4 on every parameter, up to 350 epochs; standard CIFAR
augmentation (4-pixel padding and random 32×32 crops, plus horizontal flips on CIFAR-10 only:
flipped digits are other digits). Any depth (`resnet20` ... `resnet1202`), distribution rule,
number of exits, exit type and λ. At the end the test set is evaluated with early exits at
threshold T and a row like the paper's tables is printed: accuracy, number of exits, the cost
percent of each exit, and the relative cost (mean cost per test sample / the ResNet's).

The datasets are read with torchvision from `--data-dir` (default `./data`, torchvision's
layout: `cifar-10-batches-py/` or `train_32x32.mat` and `test_32x32.mat`), and downloaded there
the first time; once the files are there it runs offline (`--no-download` never downloads).
`--fake-data N` uses N random images instead, for smoke tests.

Examples:
    python examples/cifar_resnet.py --model resnet110 --dist pareto --n-exits 10 \\
        --data-dir ~/data/cifar10
    python examples/cifar_resnet.py --dataset svhn --model resnet32 --dist fine --data-dir DIR
    python examples/cifar_resnet.py --model resnet20 --fake-data 256 --epochs 1  # smoke test
    torchrun --nproc_per_node=4 examples/cifar_resnet.py --model resnet110 --data-dir DIR

Under torchrun every process trains on its own shard with DistributedDataParallel; the global
batch stays `--batch-size` (each process takes batch_size / world_size), so the recipe is the
same on any number of GPUs. Only rank 0 prints and saves.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

import _distributed as ddp
import timm
import torch
from torch.utils.data import Dataset
from torchvision import datasets, transforms

import earlyexit

#: The number of exits the paper's tables use per depth (EENet-110: 10 in Table 7).
PAPER_N_EXITS = {"resnet20": 3, "resnet32": 5, "resnet44": 6, "resnet56": 6, "resnet110": 10}

DATASETS = {
    # name: (mean, std, flip, expected files under --data-dir)
    "cifar10": (
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
        True,
        ["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"],
    ),
    "svhn": (
        (0.4377, 0.4438, 0.4728),
        (0.1980, 0.2010, 0.1970),
        False,
        ["train_32x32.mat", "test_32x32.mat"],
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The script's argument parser."""
    parser = ddp.make_parser(
        __doc__, "See the module docstring (or the top of this file) for the recipe and examples."
    )
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS))
    data.add_argument(
        "--data-dir", default="data", help="torchvision root of the dataset (downloaded there)"
    )
    ddp.add_download_argument(data)
    data.add_argument(
        "--fake-data",
        type=int,
        default=0,
        metavar="N",
        help="train on N random 32x32 images (and test on N/4) instead of --data-dir",
    )
    data.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet110", help="resnet20/32/44/56/110/1202")
    model.add_argument(
        "--n-exits",
        type=int,
        default=None,
        help="early exits; default: the paper's for the depth (3, 5, 6, 6, 10), else 3",
    )
    ddp.add_exit_arguments(model)
    model.add_argument("--threshold", type=float, default=0.5, help="T for early exits")

    train = parser.add_argument_group("training (defaults: the paper's recipe)")
    ddp.add_loss_arguments(train)
    train.add_argument("--epochs", type=int, default=350)
    train.add_argument("--batch-size", type=int, default=256, help="global, over all processes")
    train.add_argument("--lr", type=float, default=0.1)
    train.add_argument("--lr-step", type=int, default=100, help="epochs between lr drops")
    train.add_argument("--lr-gamma", type=float, default=0.1, help="lr factor at each drop")
    train.add_argument("--momentum", type=float, default=0.9)
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument(
        "--eval-every", type=int, default=0, metavar="K", help="test every K epochs (0: at the end)"
    )
    ddp.add_run_arguments(train)

    ddp.add_output_arguments(
        parser, "where to save the trained net; default output/{dataset}-{model}-{dist}"
    )
    ddp.add_distributed_arguments(parser)
    return parser


def build_datasets(
    args: argparse.Namespace, ctx: ddp.DistContext | None = None
) -> tuple[Dataset, Dataset]:
    """The train and test sets, with the paper's augmentation on the train set.

    The dataset is downloaded into `--data-dir` when it is not there (unless `--no-download`);
    a failure ends the script with a one-line error.
    """
    mean, std, flip, expected = DATASETS[args.dataset]
    augment = [transforms.RandomCrop(32, padding=4)]
    if flip:
        augment.append(transforms.RandomHorizontalFlip())
    to_tensor = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    train_tf = transforms.Compose(augment + to_tensor)
    test_tf = transforms.Compose(to_tensor)
    if args.fake_data:
        size = (3, 32, 32)
        train = datasets.FakeData(args.fake_data, size, 10, transform=train_tf)
        test_size = max(args.fake_data // 4, 1)
        test = datasets.FakeData(test_size, size, 10, transform=test_tf, random_offset=10**6)
        return train, test
    root = Path(args.data_dir).expanduser()

    def build(download: bool) -> tuple[Dataset, Dataset]:
        if args.dataset == "cifar10":
            return (
                datasets.CIFAR10(root, train=True, transform=train_tf, download=download),
                datasets.CIFAR10(root, train=False, transform=test_tf, download=download),
            )
        return (
            datasets.SVHN(root, split="train", transform=train_tf, download=download),
            datasets.SVHN(root, split="test", transform=test_tf, download=download),
        )

    return ddp.fetch_dataset(args.dataset, root, build, expected, args.download, ctx)


def eenet_name(model: str) -> str:
    """`resnet110` -> `EENet-110`, as the paper names its models."""
    match = re.fullmatch(r"resnet(\d+)", model)
    return f"EENet-{match.group(1)}" if match else f"EE-{model}"


def paper_table(results: dict[str, Any]) -> str:
    """One row in the layout of the paper's Tables 7 and 9."""
    header = [
        "Model",
        "Dist",
        "Accuracy",
        "#Params",
        "#E",
        "Cost percent of EE-blocks",
        "Relative cost",
        "FLOPs (MMac)",
    ]
    row = [
        eenet_name(results["model"]),
        results["dist"],
        f"{100 * results['accuracy']:.2f}",
        f"{results['params'] / 1e6:.2f}M",
        results["n_exits"],
        ", ".join(str(p) for p in results["cost_percent"]),
        f"{results['relative_cost']:.2f}",
        f"{results['mean_mmac']:.2f}",
    ]
    return ddp.format_table(header, [row])


def main(argv: list[str] | None = None) -> int:
    """Run the script; returns the exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    ddp.seed_everything(args.seed)
    with ddp.session(args) as ctx:
        train_set, test_set = build_datasets(args, ctx)
        return run(args, ctx, train_set, test_set, start)


def run(
    args: argparse.Namespace,
    ctx: ddp.DistContext,
    train_set: Dataset,
    test_set: Dataset,
    start: float,
) -> int:
    """Build, train, evaluate and report (every rank runs this)."""
    progress = ctx.is_main and not args.no_progress
    n_exits = args.n_exits or PAPER_N_EXITS.get(args.model, 3)
    backbone = timm.create_model(args.model, num_classes=10)
    net = earlyexit.convert(
        backbone,
        n_exits=n_exits,
        dist=args.dist,
        exit_type=args.exit_type,
        input_size=(3, 32, 32),
        threshold=args.threshold,
    ).to(ctx.device)
    params = sum(p.numel() for p in net.parameters())
    ddp.print0(
        ctx,
        f"{eenet_name(args.model)}: {n_exits} exits after {net.exit_names}, costs "
        f"{[round(c, 3) for c in net.exit_costs.tolist()]}, {params / 1e6:.2f}M parameters; "
        f"{args.dataset}: {len(train_set)} train / {len(test_set)} test; {ctx.world_size} "
        f"process(es) on {ctx.device.type}",
    )

    train_loader, test_loader = ddp.make_loaders(train_set, test_set, args, ctx)
    model = ddp.wrap_ddp(net, ctx, args.find_unused_parameters)
    loss_kwargs = {} if args.loss_version is None else {"version": args.loss_version}
    criterion = earlyexit.EENetLoss(lam=args.lam, **loss_kwargs)
    # The recipe decays every parameter, as the ResNet paper's did.
    optimizer = torch.optim.SGD(
        net.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, args.lr_step, args.lr_gamma)
    scaler = ddp.make_scaler(args.amp, ctx)

    history: list[dict[str, Any]] = []
    for epoch in range(args.epochs):
        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loss = ddp.train_epoch(
            model, train_loader, criterion, optimizer, ctx, epoch, progress, scaler
        )
        scheduler.step()
        entry: dict[str, Any] = {"epoch": epoch, "lr": lr, "loss": loss}
        line = f"epoch {epoch + 1}/{args.epochs}  lr {lr:.4g}  loss {loss:.4f}"
        if args.eval_every and (epoch + 1) % args.eval_every == 0 and epoch + 1 < args.epochs:
            ev = ddp.evaluate_distributed(net, test_loader, ctx, progress=progress)
            entry.update(accuracy=ev.accuracy, cost=ev.cost)
            line += f"  test acc {ev.accuracy:.2%}  cost {ev.cost:.3f}"
        history.append(entry)
        ddp.print0(ctx, f"{line}  ({time.perf_counter() - t0:.1f}s)")

    ddp.finish_training(net, args, ctx)
    ev = ddp.evaluate_distributed(net, test_loader, ctx, progress=progress)

    costs = net.exit_costs.tolist()
    results: dict[str, Any] = {
        "model": args.model,
        "dataset": "fake" if args.fake_data else args.dataset,
        "dist": args.dist,
        "exit_type": args.exit_type,
        "n_exits": n_exits,
        "exit_names": net.exit_names,
        "lam": args.lam,
        "loss_version": criterion.version,
        "threshold": ev.threshold,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "world_size": ctx.world_size,
        "accuracy": ev.accuracy,
        "relative_cost": ev.cost,
        "cost_percent": [round(100 * c) for c in costs[:-1]],
        "exit_costs": costs,
        "exit_counts": ev.exit_counts,
        "exit_accuracy": ev.exit_accuracy,
        "final_exit_accuracy": ev.exit_accuracy[-1],
        "params": sum(p.numel() for p in net.parameters()),
        "backbone_mmac": net.backbone_macs / 1e6,
        "mean_mmac": ev.cost * net.backbone_macs / 1e6,
        "test_samples": ev.num_samples,
        "history": history,
        "checkpoint": None,
    }
    if ctx.is_main:
        if not args.no_save:
            out = args.output_dir or f"output/{args.dataset}-{args.model}-{args.dist}"
            extra = {"model": args.model, "num_classes": 10, "dataset": args.dataset}
            results["checkpoint"] = str(ddp.save_net(net, out, extra))
        results["wall_time_s"] = time.perf_counter() - start
        print(f"\n{ev}\n", flush=True)
        print(paper_table(results), flush=True)
        print(
            f"(final exit alone: {100 * ev.exit_accuracy[-1]:.2f}% at cost {costs[-1]:.2f}; "
            f"T={ev.threshold:g}, {ev.num_samples} test samples)",
            flush=True,
        )
        if results["checkpoint"]:
            print(f"saved {results['checkpoint']}", flush=True)
        if args.json:
            ddp.write_json(results, args.json)
    ddp.barrier(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
