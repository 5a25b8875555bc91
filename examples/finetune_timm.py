"""Fine-tune any timm model as an early-exit network on an image folder, then pick a threshold.

The model is created with timm (its pretrained weights only with `--pretrained`, from timm's
local cache, or `--checkpoint FILE`), converted with `earlyexit.convert`, and trained with
`EENetLoss` on `--data-dir/train/` (one folder per class, torchvision's `ImageFolder`). With
`--freeze-backbone` only the exits learn (and the model's own classifier, when it is new for
these classes); without it the backbone is fine-tuned too, at `--backbone-lr`. Then the
validation set (`--data-dir/val/`) is evaluated at a few thresholds T, and the
accuracy/cost trade-off is printed (relative cost: mean MACs per sample / the model's), with
a "final only" row for the model without early exits. The net is saved with its threshold set
to `--threshold` with `earlyexit.save`, and `config.json` beside it.

Examples:
    python examples/finetune_timm.py --model resnet50 --pretrained --freeze-backbone \\
        --data-dir ~/data/flowers --n-exits 4 --epochs 5
    python examples/finetune_timm.py --model convnext_tiny --checkpoint convnext_tiny.safetensors \\
        --data-dir DIR --lr 1e-3 --backbone-lr 1e-4
    python examples/finetune_timm.py --model resnet20 --fake-data 256 --epochs 1  # smoke test
    python examples/finetune_timm.py --model resnet20 --mnist-standin --data-dir data \
        --freeze-backbone --epochs 2    # no pretrained weights at hand: see below

With `--mnist-standin`, a plain model pre-trained here on MNIST (from `--data-dir/MNIST/raw`,
downloaded there unless `--no-download`) stands in for pretrained weights: `--model` is created
for 1×28×28 images and 10 classes, trained alone for `--standin-epochs` on `--standin-train`
images, and then converted and fine-tuned as above on the same training images, validated on
MNIST's test set. The report then also compares the net with the model it started from: with
`--freeze-backbone`, whether its final exit is that model bit for bit; without, how many points
the final exit moved.
    torchrun --nproc_per_node=4 examples/finetune_timm.py --model resnet50 --data-dir DIR

Under torchrun every process trains on its own shard with DistributedDataParallel and
evaluates its share of the validation set; the global batch stays `--batch-size`. Only rank 0
prints and saves.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import _distributed as ddp
import timm
import torch
from timm.data import create_transform, resolve_data_config
from torch.utils.data import Dataset
from torchvision import datasets

import earlyexit
from earlyexit.calibrate import NEVER
from earlyexit.training import freeze_backbone, param_groups


def build_parser() -> argparse.ArgumentParser:
    """The script's argument parser."""
    parser = ddp.make_parser(
        __doc__, "See the module docstring (or the top of this file) for examples."
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data-dir", default=None, help="a folder with train/ and val/ inside")
    data.add_argument(
        "--fake-data",
        type=int,
        default=0,
        metavar="N",
        help="train on N random images (validate on N/4) instead of --data-dir",
    )
    data.add_argument("--num-classes", type=int, default=10, help="classes of --fake-data")
    data.add_argument(
        "--img-size", type=int, default=None, help="input side; default: the model's own"
    )
    data.add_argument("--workers", type=int, default=4, help="DataLoader workers per process")
    data.add_argument(
        "--mnist-standin",
        action="store_true",
        help="pre-train --model on MNIST (in --data-dir) to stand in for pretrained weights",
    )
    data.add_argument("--standin-epochs", type=int, default=2, help="epochs of that pre-training")
    data.add_argument(
        "--standin-train",
        type=int,
        default=20000,
        metavar="N",
        help="MNIST training images used (pre-training and fine-tuning)",
    )
    ddp.add_download_argument(data)

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="resnet50", help="any timm model name")
    model.add_argument(
        "--pretrained",
        action="store_true",
        help="start from timm's pretrained weights (they must be in the local cache)",
    )
    model.add_argument(
        "--checkpoint", default=None, help="a local weights file for the model (implies pretrained)"
    )
    model.add_argument("--n-exits", type=int, default=3)
    ddp.add_exit_arguments(model)
    model.add_argument(
        "--threshold", type=float, default=0.5, help="T set on the saved net (and detailed)"
    )
    model.add_argument(
        "--thresholds",
        type=float,
        nargs="+",
        default=[0.2, 0.4, 0.5, 0.6, 0.8, 0.95],
        help="thresholds of the trade-off table",
    )

    train = parser.add_argument_group("training")
    train.add_argument("--freeze-backbone", action="store_true", help="train only the exits")
    ddp.add_loss_arguments(train)
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=64, help="global, over all processes")
    train.add_argument("--opt", default="adamw", choices=["adamw", "sgd"])
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate of the exits")
    train.add_argument(
        "--backbone-lr",
        type=float,
        default=None,
        help="learning rate of the backbone; default --lr",
    )
    train.add_argument("--weight-decay", type=float, default=0.05)
    ddp.add_run_arguments(train)

    ddp.add_output_arguments(parser, "where to save the net; default output/finetune-{model}")
    ddp.add_distributed_arguments(parser)
    return parser


def create_backbone(args: argparse.Namespace, num_classes: int) -> torch.nn.Module:
    """The timm model, with local pretrained weights when asked, for `num_classes` classes."""
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    pretrained = args.pretrained or args.checkpoint is not None
    if args.checkpoint is not None:
        if not Path(args.checkpoint).is_file():
            ddp.fail(f"--checkpoint {args.checkpoint!r} is not a file.")
        kwargs["pretrained_cfg_overlay"] = {"file": str(args.checkpoint)}
    try:
        return timm.create_model(args.model, pretrained=pretrained, **kwargs)
    except Exception as err:  # timm raises many kinds when weights are missing or offline
        if not pretrained and "Unknown model" not in str(err):
            raise
        message = str(err).rstrip(".")
        hint = (
            "`timm.list_models('*name*')` lists the model names."
            if "Unknown model" in message
            else "download the weights once where there is network (they go to the Hugging "
            "Face cache), pass a local file with --checkpoint, or drop --pretrained."
        )
        ddp.fail(
            f"could not create {args.model}: {message}."
            + ("" if "Hint" in message else f" Hint: {hint}")
        )


def build_datasets(
    args: argparse.Namespace, data_config: dict[str, Any]
) -> tuple[Dataset, Dataset]:
    """The train and validation sets with timm's transforms for the model."""
    train_tf = create_transform(**data_config, is_training=True)
    val_tf = create_transform(**data_config, is_training=False)
    if args.fake_data:
        size = tuple(data_config["input_size"])
        train = datasets.FakeData(args.fake_data, size, args.num_classes, transform=train_tf)
        n_val = max(args.fake_data // 4, 1)
        val = datasets.FakeData(n_val, size, args.num_classes, val_tf, random_offset=10**6)
        return train, val
    train_set = datasets.ImageFolder(Path(args.data_dir).expanduser() / "train", train_tf)
    val_set = datasets.ImageFolder(Path(args.data_dir).expanduser() / "val", val_tf)
    if train_set.classes != val_set.classes:
        ddp.fail(
            f"train/ has classes {train_set.classes} but val/ has {val_set.classes}. "
            "Hint: both need one folder per class, with the same names."
        )
    return train_set, val_set


def pretrain_standin(
    args: argparse.Namespace, ctx: ddp.DistContext, progress: bool
) -> tuple[torch.nn.Module, Dataset, Dataset]:
    """`--model` trained alone on MNIST: the stand-in for pretrained weights, and the data."""
    from torch.utils.data import DataLoader, Subset

    from earlyexit.demo import load_mnist_data
    from earlyexit.training import train_one_epoch

    if ctx.distributed:
        ddp.fail("--mnist-standin runs in one process. Hint: run it without torchrun.")
    try:
        train, val = load_mnist_data(args.data_dir or "data", download=args.download)
    except FileNotFoundError as err:
        ddp.fail(str(err))
    train = Subset(train, range(min(args.standin_train, len(train))))
    model = timm.create_model(args.model, in_chans=1, num_classes=10).to(ctx.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(
        train, batch_size=args.batch_size, shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )  # fmt: skip
    for epoch in range(args.standin_epochs):
        loss = train_one_epoch(
            model, loader, torch.nn.CrossEntropyLoss(), optimizer, epoch=epoch,
            progress=progress,
        )  # fmt: skip
        ddp.print0(ctx, f"pre-training {args.model} on MNIST: epoch {epoch + 1}, loss {loss:.4f}")
    return model.eval(), train, val


@torch.no_grad()
def compare_with_start(
    net: earlyexit.EarlyExitNet, start: torch.nn.Module, val_set: Dataset, device: torch.device
) -> dict[str, Any]:
    """The net's final exit against the model it was converted from, on the validation set."""
    from torch.utils.data import DataLoader

    net.eval()
    start.eval()
    same, hits_start, hits_final, n = True, 0, 0, 0
    for x, y in DataLoader(val_set, batch_size=500):
        x, y = x.to(device), y.to(device)
        final = net.forward_all(x).logits[-1]  # the final exit, as training sees it
        reference = start(x)
        same = same and torch.equal(final, reference)
        hits_final += int((final.argmax(1) == y).sum())
        hits_start += int((reference.argmax(1) == y).sum())
        n += len(y)
    return {
        "start_accuracy": hits_start / n,
        "final_exit_accuracy": hits_final / n,
        "final_exit_identical": same,
    }


def check_data_dir(args: argparse.Namespace) -> list[str]:
    """The class names of `--data-dir`, or an error that says what is missing."""
    if args.mnist_standin:
        return [str(i) for i in range(10)]
    if args.fake_data:
        return [str(i) for i in range(args.num_classes)]
    if args.data_dir is None:
        ddp.fail("give --data-dir (a folder with train/ and val/) or --fake-data N.")
    root = Path(args.data_dir).expanduser()
    missing = [p for p in ("train", "val") if not (root / p).is_dir()]
    if missing:
        ddp.fail(
            f"{str(root)!r} has no {' or '.join(p + '/' for p in missing)} folder. Hint: the "
            "layout is DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg (torchvision ImageFolder)."
        )
    return sorted(p.name for p in (root / "train").iterdir() if p.is_dir())


def main(argv: list[str] | None = None) -> int:
    """Run the script; returns the exit status."""
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    classes = check_data_dir(args)
    ddp.seed_everything(args.seed)
    with ddp.session(args) as ctx:
        return run(args, ctx, classes, start)


def run(args: argparse.Namespace, ctx: ddp.DistContext, classes: list[str], start: float) -> int:
    """Build, train, evaluate and report (every rank runs this)."""
    progress = ctx.is_main and not args.no_progress
    start_model = None
    if args.mnist_standin:
        backbone, train_set, val_set = pretrain_standin(args, ctx, progress)
        start_model = copy.deepcopy(backbone)
        data_config = {"input_size": (1, 28, 28)}
    else:
        backbone = create_backbone(args, len(classes))
        overrides = (
            {} if args.img_size is None else {"input_size": (3, args.img_size, args.img_size)}
        )
        data_config = resolve_data_config(overrides, model=backbone)
        train_set, val_set = build_datasets(args, data_config)
    if isinstance(train_set, datasets.ImageFolder):
        classes = train_set.classes

    net = earlyexit.convert(
        backbone,
        n_exits=args.n_exits,
        dist=args.dist,
        exit_type=args.exit_type,
        input_size=data_config["input_size"],
        threshold=args.threshold,
    ).to(ctx.device)
    pretrained = args.pretrained or args.checkpoint is not None or args.mnist_standin
    if args.freeze_backbone:
        if not pretrained:
            ddp.print0(ctx, "warning: --freeze-backbone without pretrained weights")
        freeze_backbone(net)
        # The classifier timm made for these classes is new: the final exit must learn too.
        new_classifier = not args.mnist_standin and (
            not pretrained or len(classes) != backbone.pretrained_cfg.get("num_classes")
        )
        if new_classifier:
            backbone.get_classifier().requires_grad_(True)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    ddp.print0(
        ctx,
        f"{args.model} -> {args.n_exits} exits after {net.exit_names}, costs "
        f"{[round(c, 3) for c in net.exit_costs.tolist()]}; {trainable:,} trainable "
        f"parameters; {len(train_set)} train / {len(val_set)} val images, {len(classes)} "
        f"classes; {ctx.world_size} process(es) on {ctx.device.type}",
    )

    train_loader, val_loader = ddp.make_loaders(train_set, val_set, args, ctx)
    model = ddp.wrap_ddp(net, ctx, args.find_unused_parameters)
    loss_kwargs = {} if args.loss_version is None else {"version": args.loss_version}
    criterion = earlyexit.EENetLoss(lam=args.lam, **loss_kwargs)
    groups = param_groups(net, args.lr, args.backbone_lr, args.weight_decay)
    if args.opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.epochs, 1))
    scaler = ddp.make_scaler(args.amp, ctx)

    history: list[dict[str, Any]] = []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        loss = ddp.train_epoch(
            model, train_loader, criterion, optimizer, ctx, epoch, progress, scaler
        )
        scheduler.step()
        history.append({"epoch": epoch, "loss": loss})
        ddp.print0(
            ctx,
            f"epoch {epoch + 1}/{args.epochs}  loss {loss:.4f}  ({time.perf_counter() - t0:.1f}s)",
        )

    ddp.finish_training(net, args, ctx)
    thresholds = [*sorted(set(args.thresholds)), NEVER]
    curve = ddp.tradeoff_distributed(net, val_loader, ctx, thresholds, progress)
    chosen = ddp.evaluate_distributed(net, val_loader, ctx, progress=progress)

    results: dict[str, Any] = {
        "model": args.model,
        "dataset": "mnist"
        if args.mnist_standin
        else "fake"
        if args.fake_data
        else str(args.data_dir),
        "classes": classes,
        "input_size": list(data_config["input_size"]),
        "pretrained": pretrained,
        "freeze_backbone": args.freeze_backbone,
        "dist": args.dist,
        "exit_type": args.exit_type,
        "n_exits": args.n_exits,
        "exit_names": net.exit_names,
        "exit_costs": net.exit_costs.tolist(),
        "lam": args.lam,
        "loss_version": criterion.version,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "world_size": ctx.world_size,
        "history": history,
        "tradeoff": curve.to_rows(),
        "final_exit_accuracy": curve.reference_accuracy,
        "threshold": chosen.threshold,
        "accuracy": chosen.accuracy,
        "relative_cost": chosen.cost,
        "exit_counts": chosen.exit_counts,
        "exit_accuracy": chosen.exit_accuracy,
        "checkpoint": None,
    }
    if start_model is not None:
        results["start"] = compare_with_start(net, start_model, val_set, ctx.device)
    if ctx.is_main:
        if not args.no_save:
            out = args.output_dir or f"output/finetune-{args.model}"
            extra = {
                "model": args.model,
                "num_classes": len(classes),
                "classes": classes,
                "pretrained": pretrained,
            }
            results["checkpoint"] = str(ddp.save_net(net, out, extra))
        results["wall_time_s"] = time.perf_counter() - start
        print("\naccuracy/cost trade-off on the validation set (T = never: no early exit):")
        print(curve)
        print(f"\nat T={chosen.threshold:g}:\n{chosen}", flush=True)
        if start_model is not None:
            r = results["start"]
            moved = 100 * (r["final_exit_accuracy"] - r["start_accuracy"])
            print(
                f"the model it started from: {100 * r['start_accuracy']:.2f} %; the final "
                f"exit: {100 * r['final_exit_accuracy']:.2f} % ({moved:+.2f} points), "
                f"{'identical' if r['final_exit_identical'] else 'not identical'} to it "
                "bit for bit",
                flush=True,
            )
        if results["checkpoint"]:
            print(f"saved {results['checkpoint']} (threshold {net.threshold:g})", flush=True)
        if args.json:
            ddp.write_json(results, args.json)
    ddp.barrier(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
