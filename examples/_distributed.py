"""Plumbing the example scripts share: common options, torchrun / DDP, training, result files.

Not library code: the examples import it from their own folder. A script started with plain
`python` runs as a single process; started with `torchrun --nproc_per_node=K` it runs K
processes that train one model with DistributedDataParallel (DDP), each on its own shard of the
data; evaluation is split over the processes too (and summed), and only rank 0 prints and
saves.

    torchrun --nproc_per_node=2 examples/cifar_resnet.py --fake-data 512 --epochs 1
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=8 examples/...
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import math
import os
import random
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import earlyexit

__all__ = [
    "DistContext",
    "ShardSampler",
    "add_distributed_arguments",
    "add_download_argument",
    "add_exit_arguments",
    "add_loss_arguments",
    "add_output_arguments",
    "add_run_arguments",
    "all_reduce_mean",
    "barrier",
    "cleanup",
    "evaluate_distributed",
    "fail",
    "fetch_dataset",
    "finish_training",
    "format_table",
    "make_loader",
    "make_loaders",
    "make_parser",
    "make_scaler",
    "per_rank_batch_size",
    "print0",
    "save_net",
    "seed_everything",
    "session",
    "setup",
    "state_digest",
    "sync_buffers",
    "tradeoff_distributed",
    "train_epoch",
    "unwrap",
    "wrap_ddp",
    "write_digest",
    "write_json",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    Attributes:
        rank: this process's global rank (0 for a single process).
        world_size: the number of processes.
        local_rank: the rank within this node; picks the GPU.
        device: the device this process trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        """Whether a process group is in use (more than one process)."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that prints and saves."""
        return self.rank == 0


def make_parser(doc: str, epilog: str) -> argparse.ArgumentParser:
    """An example's argument parser: the first paragraph of its docstring, defaults shown."""
    return argparse.ArgumentParser(
        description=doc.split("\n\n")[0],
        epilog=epilog,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_exit_arguments(group: Any) -> None:
    """Add `--dist` and `--exit-type`, the placement and kind of the exits."""
    from earlyexit import DISTRIBUTIONS

    group.add_argument("--dist", default="pareto", choices=list(DISTRIBUTIONS))
    group.add_argument(
        "--exit-type",
        default="conv",
        choices=["conv", "plain", "pool", "bnpool"],
        help="exit head (default conv, the library's; the paper's are plain, pool and bnpool)",
    )


def add_loss_arguments(group: Any) -> None:
    """Add `--lam` and `--loss-version`, the settings of `EENetLoss`."""
    group.add_argument("--lam", type=float, default=1.0, help="λ, the weight of the cost")
    group.add_argument(
        "--loss-version",
        default=None,
        choices=["exits", "v2+ce", "v2", "v1", "mc", "cost"],
        help="EENetLoss version; default: the library's recommended one",
    )


def add_run_arguments(group: Any) -> None:
    """Add `--amp`, `--seed` and `--find-unused-parameters`."""
    group.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument(
        "--find-unused-parameters",
        action="store_true",
        help="DDP option, for backbones with parameters that a forward pass skips",
    )


def add_output_arguments(parser: Any, output_dir_help: str) -> None:
    """Add the `output` group: `--output-dir`, `--no-save`, `--json`, `--no-progress`, ...

    Args:
        parser: the argparse parser.
        output_dir_help: the help of `--output-dir`, which says the script's default folder.
    """
    out = parser.add_argument_group("output")
    out.add_argument("--output-dir", default=None, help=output_dir_help)
    out.add_argument("--no-save", action="store_true", help="don't save the trained net")
    out.add_argument(
        "--json", default=None, metavar="PATH", help="write results as JSON ('-': stdout)"
    )
    out.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    out.add_argument(
        "--digest-dir",
        default=None,
        help="every rank writes a SHA-256 of its final weights here (checks DDP replicas agree)",
    )


def add_distributed_arguments(parser: Any) -> None:
    """Add `--device`, `--backend` and `--dist-timeout` to an argparse parser."""
    group = parser.add_argument_group("devices and torchrun")
    group.add_argument(
        "--device",
        default=None,
        help="cpu, cuda or cuda:K; default: this process's GPU (LOCAL_RANK) if CUDA is there",
    )
    group.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "nccl", "gloo"],
        help="process-group backend under torchrun; auto = nccl on GPUs, gloo on CPU",
    )
    group.add_argument(
        "--dist-timeout",
        type=float,
        default=60.0,
        metavar="MIN",
        help="minutes a collective may wait (the other ranks wait while rank 0 saves)",
    )


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value in (None, "") else int(value)


def setup(
    device: str | None = None, backend: str = "auto", timeout_min: float = 60.0
) -> DistContext:
    """Join the torchrun job, if there is one, and pick this process's device.

    torchrun sets `RANK`, `WORLD_SIZE` and `LOCAL_RANK`; without them this is a single process
    and no process group is made.

    Args:
        device: `cpu`, `cuda` or `cuda:K`; None picks `cuda:LOCAL_RANK` when CUDA is available.
        backend: `nccl`, `gloo` or `auto` (nccl for CUDA devices, gloo otherwise).
        timeout_min: how long a collective may wait, in minutes.

    Returns:
        The `DistContext` of this process.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda":
        device = f"cuda:{local_rank}"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if dev.type == "cuda" else "gloo"
        if backend == "nccl" and dev.type != "cuda":
            raise ValueError(
                f"The nccl backend needs CUDA devices, got device={device!r}. "
                "Hint: use --backend gloo (or auto) on CPU."
            )
        kwargs: dict[str, Any] = {}
        if backend == "nccl":
            kwargs["device_id"] = dev  # binds the communicator to this GPU up front
        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(minutes=timeout_min),
            **kwargs,
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


@contextlib.contextmanager
def session(args: argparse.Namespace) -> Iterator[DistContext]:
    """`setup` from the `add_distributed_arguments` options; `cleanup` on the way out."""
    ctx = setup(args.device, args.backend, args.dist_timeout)
    try:
        yield ctx
    finally:
        cleanup()


def fail(message: str) -> NoReturn:
    """Exit with status 2 and a message on stderr, printed once (by rank 0) under torchrun."""
    if _env_int("RANK", 0) == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def cleanup() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if ctx.distributed:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def add_download_argument(group: Any) -> None:
    """Add `--download/--no-download`: whether `fetch_dataset` may download what is missing."""
    group.add_argument(
        "--download",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="download the dataset with torchvision into --data-dir when it is not there yet "
        "(files already there are used as they are, offline); --no-download only reads",
    )


def _one_line(err: BaseException) -> str:
    """`Type: last line of the message`: torchvision's download errors span several lines."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[-1]}" if lines else type(err).__name__


def fetch_dataset(
    name: str,
    root: Path,
    build: Callable[[bool], Any],
    expected: Sequence[str],
    download: bool = True,
    ctx: DistContext | None = None,
    fake_data: bool = True,
) -> Any:
    """A torchvision dataset from `root`, downloaded there first when it is not there yet.

    torchvision skips the download when the files are there and intact, so once the data is in
    place this works offline. Under torchrun one process per node downloads while the others
    wait. Every failure ends the script with one line on stderr (`fail`), not a traceback.

    Args:
        name: the dataset's name, for messages.
        root: torchvision's `root` folder (`--data-dir`).
        build: makes the dataset(s) with torchvision; with `True` it downloads what is missing.
        expected: files under `root` that hold the data, named in messages when missing.
        download: whether to download what is missing (`--download`).
        ctx: this process's place in a torchrun job; a single process when None.
        fake_data: whether the script has `--fake-data N`, for the hints.

    Returns:
        What `build` returns.
    """
    error: BaseException | None = None
    if download and (ctx is None or ctx.local_rank == 0):
        try:
            result = build(True)
        except (OSError, RuntimeError, ValueError) as err:  # urllib's URLError is an OSError
            error = err
        else:
            if ctx is not None:
                barrier(ctx)
            return result
    if ctx is not None:
        barrier(ctx)
    missing = [f for f in expected if not (root / f).exists()]
    smoke = "; --fake-data N runs a smoke test without data" if fake_data else ""
    if missing:
        where = f"{name} is not in {str(root)!r} (missing {', '.join(missing)})"
        if error is not None:
            fail(
                f"{where} and could not be downloaded ({_one_line(error)}). Hint: run once "
                f"where there is network, or copy the files into --data-dir{smoke}."
            )
        if not download:
            fail(
                f"{where}. Hint: leave out --no-download to download it with torchvision, "
                f"or point --data-dir at a copy{smoke}."
            )
        fail(f"{where} after the download. Hint: check that --data-dir is writable.")
    try:
        return build(False)
    except (OSError, RuntimeError, ValueError) as err:
        fail(
            f"could not read {name} from {str(root)!r} ({_one_line(error or err)}). Hint: "
            "delete its files there to download them again, or point --data-dir at a good copy."
        )


def print0(ctx: DistContext, *args: Any, **kwargs: Any) -> None:
    """`print`, on rank 0 only."""
    if ctx.is_main:
        print(*args, **kwargs, flush=True)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (if present) and torch, the same on every rank.

    The same seed everywhere makes every replica build the same model; DDP broadcasts rank 0's
    weights anyway. Data order differs per rank through the sampler, not the seed.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    with contextlib.suppress(ImportError):
        import numpy as np

        np.random.seed(seed % 2**32)


def per_rank_batch_size(batch_size: int, ctx: DistContext) -> int:
    """Split a global batch size over the ranks.

    Raises:
        ValueError: when it does not divide evenly.
    """
    if batch_size < 1 or batch_size % ctx.world_size:
        raise ValueError(
            f"Expected --batch-size to be a positive multiple of the {ctx.world_size} processes, "
            f"got {batch_size}. Hint: the batch size is global (the paper's 256 in all); "
            "each process takes batch_size / world_size."
        )
    return batch_size // ctx.world_size


class ShardSampler(Sampler[int]):
    """Rank r takes samples r, r + W, r + 2W, ... in order: every sample once, no padding.

    `DistributedSampler` pads the last shard with repeats so that ranks stay in step, which
    would count some test samples twice; evaluation has no collectives per batch, so uneven
    shards are fine.
    """

    def __init__(self, dataset: Dataset, ctx: DistContext) -> None:
        self.indices = range(ctx.rank, len(dataset), ctx.world_size)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    ctx: DistContext,
    train: bool,
    workers: int = 4,
    seed: int = 0,
) -> DataLoader:
    """A `DataLoader` for this rank.

    Training loaders shuffle through a `DistributedSampler` (call `set_epoch` on
    `loader.sampler` before each epoch) and drop the last incomplete batch, so that every rank
    runs the same number of steps. Evaluation loaders keep the order and every sample.

    Args:
        dataset: the dataset.
        batch_size: samples per batch on this rank.
        ctx: this process's context.
        train: shuffle and drop the last batch.
        workers: `DataLoader` worker processes.
        seed: the shuffling seed (the same on every rank).
    """
    if train:
        sampler: Sampler[int] = DistributedSampler(
            dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed
        )
        if len(sampler) < batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"Each of the {ctx.world_size} processes gets {len(sampler)} training samples, "  # type: ignore[arg-type]
                f"fewer than one batch of {batch_size}. Hint: use a smaller --batch-size."
            )
    else:
        sampler = ShardSampler(dataset, ctx)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        drop_last=train,
        persistent_workers=workers > 0,
    )


def make_loaders(
    train_set: Dataset, eval_set: Dataset, args: argparse.Namespace, ctx: DistContext
) -> tuple[DataLoader, DataLoader]:
    """This rank's training and evaluation loaders, from `--batch-size`, `--workers`, `--seed`.

    `--batch-size` is global: each rank takes its share (`per_rank_batch_size`).
    """
    batch = per_rank_batch_size(args.batch_size, ctx)
    train = make_loader(train_set, batch, ctx, True, args.workers, args.seed)
    return train, make_loader(eval_set, batch, ctx, False, args.workers)


def wrap_ddp(net: nn.Module, ctx: DistContext, find_unused_parameters: bool = False) -> nn.Module:
    """Wrap a model in DistributedDataParallel when there are several processes.

    DDP hooks the parameters' gradients, so the early-exit net's stages (which share the
    backbone's parameters) are synchronised like any module; its `ExitOutputs` pass through.
    """
    if not ctx.distributed:
        return net
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        net, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )


def make_scaler(amp: bool, ctx: DistContext) -> torch.amp.GradScaler | None:
    """A float16 gradient scaler for `--amp` on CUDA; None otherwise (with a warning on CPU)."""
    if not amp:
        return None
    if ctx.device.type != "cuda":
        print0(ctx, "warning: --amp needs CUDA; training in float32")
        return None
    return torch.amp.GradScaler("cuda")


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    ctx: DistContext,
    epoch: int,
    progress: bool,
    scaler: torch.amp.GradScaler | None,
) -> float:
    """One epoch of `earlyexit.training.train_one_epoch` on this rank's shard.

    Returns:
        The mean training loss over the ranks.
    """
    from earlyexit.training import train_one_epoch

    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    loss = train_one_epoch(model, loader, criterion, optimizer, ctx.device, epoch, progress, scaler)
    return all_reduce_mean(loss, ctx)


def finish_training(net: nn.Module, args: argparse.Namespace, ctx: DistContext) -> None:
    """Make the replicas identical (`sync_buffers`) and write the `--digest-dir` digest."""
    sync_buffers(net, ctx)
    if args.digest_dir:
        write_digest(net, args.digest_dir, ctx)


def unwrap(net: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (or the model itself)."""
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def all_reduce_mean(value: float, ctx: DistContext) -> float:
    """The mean of a float over the ranks."""
    if not ctx.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item() / ctx.world_size


def sync_buffers(net: nn.Module, ctx: DistContext) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP keeps the parameters identical, and broadcasts buffers at the start of each forward,
    but the last forward of training updates each rank's running statistics from its own
    batch. Syncing afterwards makes the replicas identical, so any rank could save or serve.
    """
    if not ctx.distributed:
        return
    for buf in unwrap(net).buffers():
        dist.broadcast(buf.data, src=0)


def evaluate_distributed(
    net: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    threshold: float | None = None,
    progress: bool = True,
) -> Any:
    """`earlyexit.training.evaluate` on every rank's shard, summed into one `Evaluation`.

    Each rank evaluates the samples its `ShardSampler` gives it (every sample exactly once over
    all ranks) and the counts are all-reduced, so every rank returns the same result, equal to
    a single-process evaluation of the whole set.
    """
    from earlyexit.training import Evaluation, evaluate

    model = unwrap(net)
    local = evaluate(model, loader, threshold, ctx.device, progress) if len(loader) else None
    if not ctx.distributed:
        if local is None:
            raise ValueError("Expected an evaluation set with at least one sample, got none.")
        return local
    n_out = model.num_exits + 1  # type: ignore[operator]
    sums = torch.zeros(3 + 2 * n_out, dtype=torch.float64, device=ctx.device)
    if local is not None:
        n = local.num_samples
        sums[0], sums[1], sums[2] = n, local.accuracy * n, local.cost * n
        sums[3 : 3 + n_out] = torch.tensor(local.exit_counts, dtype=torch.float64)
        sums[3 + n_out :] = torch.tensor(local.exit_accuracy, dtype=torch.float64) * n
    dist.all_reduce(sums)
    total = int(sums[0].round())
    if total == 0:
        raise ValueError("Expected an evaluation set with at least one sample, got none.")
    t = model.threshold if threshold is None else threshold  # type: ignore[union-attr]
    return Evaluation(
        accuracy=round(sums[1].item()) / total,
        cost=sums[2].item() / total,
        exit_counts=[round(c) for c in sums[3 : 3 + n_out].tolist()],
        exit_accuracy=[round(c) / total for c in sums[3 + n_out :].tolist()],
        exit_costs=[float(c) for c in model.exit_costs.tolist()],  # type: ignore[operator]
        num_samples=total,
        threshold=float(t),
    )


def tradeoff_distributed(
    net: nn.Module,
    loader: DataLoader,
    ctx: DistContext,
    thresholds: Sequence[float],
    progress: bool = True,
) -> Any:
    """`earlyexit.calibrate.tradeoff_curve` on every rank's shard, summed into one curve.

    As `evaluate_distributed`: one pass per rank over its own samples, then an all-reduce, so
    every rank returns the curve of the whole set.
    """
    from earlyexit.calibrate import TradeoffCurve, tradeoff_curve

    model = unwrap(net)
    values = [float(t) for t in thresholds]
    local = tradeoff_curve(model, loader, values, progress=progress) if len(loader) else None
    if not ctx.distributed:
        if local is None:
            raise ValueError("Expected an evaluation set with at least one sample, got none.")
        return local
    k, n_out = len(values), model.num_exits + 1  # type: ignore[operator]
    sums = torch.zeros(1 + 2 * k + k * n_out + n_out, dtype=torch.float64, device=ctx.device)
    if local is not None:
        n = local.num_samples
        parts = [
            [n],
            [a * n for a in local.accuracy],
            [c * n for c in local.mean_cost],
            [c for row in local.exit_counts for c in row],
            [a * n for a in local.exit_accuracy],
        ]
        sums.copy_(torch.tensor([v for p in parts for v in p], dtype=torch.float64))
    dist.all_reduce(sums)
    total = round(sums[0].item())
    if total == 0:
        raise ValueError("Expected an evaluation set with at least one sample, got none.")
    acc, cost, counts, own = sums[1:].split([k, k, k * n_out, n_out])
    return TradeoffCurve(
        thresholds=values if local is None else local.thresholds,
        accuracy=[round(a) / total for a in acc.tolist()],
        mean_cost=[c / total for c in cost.tolist()],
        exit_counts=[[round(c) for c in row] for row in counts.view(k, n_out).tolist()],
        exit_accuracy=[round(a) / total for a in own.tolist()],
        exit_costs=[float(c) for c in model.exit_costs.tolist()],  # type: ignore[operator]
        num_samples=total,
    )


def state_digest(net: nn.Module) -> str:
    """A SHA-256 of a model's state dict, tensor bytes and names in order."""
    h = hashlib.sha256()
    for name, tensor in unwrap(net).state_dict().items():
        h.update(name.encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{tuple(tensor.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def write_digest(net: nn.Module, directory: str | os.PathLike[str], ctx: DistContext) -> Path:
    """Write this rank's weight digest to `directory/rank{R}.sha256` (every rank writes)."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"rank{ctx.rank}.sha256"
    out.write_text(state_digest(net) + "\n")
    return out


def _json_ready(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _json_ready(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(results: dict[str, Any], path: str) -> None:
    """Write results as JSON to `path`, or to stdout when `path` is `-`."""
    text = json.dumps(_json_ready(results), indent=2)
    if path == "-":
        print(text, flush=True)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")


def save_net(net: nn.Module, directory: str | os.PathLike[str], extra: dict[str, Any]) -> Path:
    """Save an early-exit net to `directory/model.safetensors` with `earlyexit.save`.

    `config.json` beside it holds the resolved config and `extra` (model name, classes...),
    for people reading the folder; `earlyexit.load` needs only the weights file.

    Returns:
        The weights file.
    """
    net = unwrap(net)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    config = {"earlyexit": net.config.to_dict(), **extra}  # type: ignore[union-attr]
    (out / "config.json").write_text(json.dumps(_json_ready(config), indent=2) + "\n")
    path = out / "model.safetensors"
    earlyexit.save(net, path)  # type: ignore[arg-type]
    return path


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with columns padded to their widest cell."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
