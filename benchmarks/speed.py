"""How fast is batched early-exit inference, compared with what its MACs promise?

For a converted model and a chosen *exit pattern* (the share of samples leaving at each exit),
over a range of batch sizes, this measures with `torch.utils.benchmark.Timer`:

- **efficiency** = (time of `early_exit` with no early exits ÷ time of `early_exit`) ÷
  (c_N ÷ mean cost): 1.0 means the wall-clock speed-up is exactly the MAC saving.
- **overhead** = time of `early_exit` with no early exits ÷ time of the original model: what
  splitting into stages, the heads and the bookkeeping cost when nobody leaves early.
- **vs reference**: throughput of `early_exit` ÷ throughput of the reference implementation's
  loop, which runs each sample alone and checks `sigmoid(a).item() >= T` after each exit.

How the pattern is made. The backbone and heads are untrained, so confidences mean nothing; the
pattern is forced instead. On a fixed set of random inputs (`--samples`, default 256, split into
batches of each size), `forward_all` gives every exit's confidence logit a_i. Each confidence
branch is rescaled to unit spread, then its bias is set so that, of the samples still running
at exit i, exactly the chosen number have a_i >= 0 (h_i >= 0.5 = T): the bias goes midway
between the two logits that separate leavers from stayers. The confidences stay a function of
the input, so which samples leave is decided by the data, as in a trained net, and the mix of
exits inside each batch is as random as the inputs. The achieved histogram is measured by
running `early_exit` and printed; the mean cost in the efficiency is the achieved one (with
`--amp` it can miss the target by a few samples: bfloat16 rounds the confidences coarsely).

Timings are interleaved (original, no-exit and early-exit take turns in each round, in a
shuffled order); by default each function's fastest round is used (`--stat min`), since other
processes only ever add time, or else the medians over rounds of the per-round ratios
(`--stat median`). On a shared machine, `--clock process` times this process's CPU time
instead of the wall clock, and `--threads 1` avoids OpenMP threads spinning at barriers while a
sibling thread is descheduled (or set `OMP_WAIT_POLICY=PASSIVE`). By default glibc's allocator
is tuned first (`--malloc tuned`, see `tune_malloc`): with its defaults every activation is
page-faulted in afresh, which costs 15-25 % of a CPU forward pass and differs between the
original module and the traced stages, drowning what is being measured.

    python benchmarks/speed.py --model resnet110 --n-exits 10 --batch-sizes 256 --threads 2
    python benchmarks/speed.py --batch-sizes 1 4 16 64 256 --pattern uniform --json speed.json
    python benchmarks/speed.py --batch-sizes 256 --profile-stages
    python benchmarks/speed.py --replot a.json b.json --plot speed.png   # draw saved results
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import timm
import torch

# torch.utils.benchmark imports cpp_extension, which warns on machines without CUDA.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

import earlyexit  # noqa: E402

NEVER = 2.0  # a threshold above 1: no sample leaves early


def pattern_shares(pattern: str, n_exits: int) -> list[float]:
    """The share of samples leaving at each of the N+1 exits, for a named pattern.

    `uniform`: equal shares; `none`: all at the final exit; `first`: all at exit 0; `halving`:
    half of the remaining samples leave at each early exit; or comma-separated shares.
    """
    n = n_exits + 1
    if pattern == "uniform":
        return [1 / n] * n
    if pattern == "none":
        return [0.0] * n_exits + [1.0]
    if pattern == "first":
        return [1.0] + [0.0] * n_exits
    if pattern == "halving":
        shares = [0.5 ** (i + 1) for i in range(n_exits)]
        return [*shares, 1 - sum(shares)]
    shares = [float(s) for s in pattern.split(",")]
    if len(shares) != n or min(shares) < 0 or sum(shares) <= 0:
        raise SystemExit(f"--pattern needs {n} non-negative comma-separated shares, got {pattern}")
    return [s / sum(shares) for s in shares]


def apportion(shares: Sequence[float], total: int) -> list[int]:
    """Integer counts summing to `total`, proportional to `shares` (largest remainder)."""
    raw = [s * total for s in shares]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


@torch.no_grad()
def force_pattern(net: earlyexit.EarlyExitNet, x: torch.Tensor, counts: Sequence[int]) -> None:
    """Set the confidence branches so that `counts[i]` samples of `x` leave at exit i (T=0.5)."""
    was_training = net.training
    net.eval()
    out = net.forward_all(x)
    remaining = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for i, (head, a) in enumerate(zip(net.heads, out.confidence_logits, strict=True)):
        a = a.float()
        scale = a.std().clamp_min(1e-12)
        head.confidence.weight.div_(scale)
        head.confidence.bias.copy_((head.confidence.bias - a.mean()) / scale)
        a = (a - a.mean()) / scale
        values = a[remaining].sort(descending=True).values
        k = counts[i]
        if k == 0:
            bias = -(values[0] + 1.0)
        elif k >= values.numel():
            bias = -(values[-1] - 1.0)
        else:
            bias = -(values[k - 1] + values[k]) / 2
        head.confidence.bias.add_(bias)
        leave = remaining & (a + bias >= 0)
        remaining &= ~leave
    net.train(was_training)


def reference_early_exit(
    stages: Sequence[torch.nn.Module],
    heads: Sequence[torch.nn.Module],
    x: torch.Tensor,
    threshold: float,
) -> tuple[list[torch.Tensor], list[int]]:
    """The reference implementation's loop: every sample alone, a host check after each exit."""
    logits, exits = [], []
    for sample in x.split(1):
        h = sample
        for i, head in enumerate(heads):
            h = stages[i](h)
            z, a = head(h)
            if torch.sigmoid(a).item() >= threshold:
                logits.append(z)
                exits.append(i)
                break
        else:
            logits.append(stages[-1](h))
            exits.append(len(heads))
    return logits, exits


@dataclass
class Row:
    """One measured configuration."""

    device: str
    batch_size: int
    threads: int
    compile: bool
    channels_last: bool
    amp: bool
    pattern: str
    mean_cost: float
    c_n: float
    exit_histogram: list[int]
    ms_per_sample_original: float
    ms_per_sample_no_exit: float
    ms_per_sample_early_exit: float
    ms_per_sample_reference: float | None
    efficiency: float
    overhead: float
    speedup_vs_reference: float | None
    rounds: list[dict[str, float]] = field(default_factory=list)


def tune_malloc() -> bool:
    """Keep freed activations in the heap instead of returning them to the OS (glibc only).

    By default glibc serves allocations above 128 KiB-32 MiB with fresh `mmap`s and gives
    memory back on `free`, so every activation tensor is page-faulted in again: at batch 64 on
    resnet110 that is ~50,000 minor faults and 15-25 % of the CPU time of a forward pass, in
    amounts that differ between the original module and the traced stages. This is what
    `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824` (or jemalloc/tcmalloc,
    as PyTorch's CPU tuning guide advises) does, set from inside the process.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024) == 1
    return ok and libc.mallopt(m_trim_threshold, 1 << 30) == 1


CLOCKS = {"wall": time.perf_counter, "process": time.process_time}
_clock = CLOCKS["wall"]


def timed(fn: Callable[[], object], threads: int, device: torch.device) -> float:
    """Seconds for one call of `fn`, with the Timer's synchronisation and thread setting."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, timer=_clock)
    return timer.timeit(1).median


def warm_up(fn: Callable[[], object], seconds: float = 0.0) -> None:
    fn()
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()


def autocast(device: torch.device, amp: bool):
    if not amp:
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def create_untrained(args: argparse.Namespace) -> torch.nn.Module:
    """The model, untrained, in eval mode.

    The library's CIFAR ResNets start each block as its shortcut (`zero_init_last=True`): with
    their default He init, an untrained deep one blows up in eval mode (ResNet-110's logits
    reach 1e8), which has nothing to do with speed.
    """
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    if isinstance(model, earlyexit.models.CifarResNet):
        model = timm.create_model(
            args.model, pretrained=False, num_classes=args.num_classes, zero_init_last=True
        )
    return model.eval()


def measure(
    args: argparse.Namespace,
    device: torch.device,
    batch_size: int,
    shares: list[float],
    reference_cache: dict[str, float],
) -> Row:
    torch.manual_seed(args.seed)
    model = create_untrained(args)
    input_size = tuple(args.input_size) if args.input_size else None
    net = earlyexit.convert(
        model,
        n_exits=args.n_exits,
        dist=args.dist,
        exit_type=args.exit_type,
        input_size=input_size,
    )
    net = net.eval().to(device)
    size = net.input_size
    samples = batch_size * max(1, math.ceil(args.samples / batch_size))
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randn(samples, *size, generator=gen).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
        data = data.contiguous(memory_format=torch.channels_last)
    with autocast(device, args.amp):  # the pattern holds for the numerics that are timed
        force_pattern(net, data, apportion(shares, samples))
    net.threshold = 0.5
    batches = list(data.split(batch_size))
    original: Callable[[torch.Tensor], object] = net.backbone
    if args.compile:
        net.compile()
        original = torch.compile(net.backbone, dynamic=True)

    with torch.inference_mode(), autocast(device, args.amp):
        results = [net.early_exit(b) for b in batches]
    exit_index = torch.cat([r.exit_index for r in results])
    histogram = torch.bincount(exit_index.cpu(), minlength=net.num_exits + 1).tolist()
    mean_cost = float(net.exit_costs.cpu()[exit_index.cpu()].mean())
    c_n = float(net.exit_costs[-1])

    def run(fn: Callable[[torch.Tensor], object]) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode(), autocast(device, args.amp):
                for b in batches:
                    fn(b)

        return go

    fns = {
        "original": run(original),
        "no_exit": run(lambda b: net.early_exit(b, threshold=NEVER)),
        "early_exit": run(net.early_exit),
    }
    stages, heads = net.stages(), list(net.heads)
    reference = None
    if args.reference and str(device) not in reference_cache:
        # The reference runs sample by sample: its speed does not depend on the batch size.
        reference = run(lambda b: reference_early_exit(stages, heads, b, net.threshold))
    for fn in fns.values():
        warm_up(fn, args.warmup)
    rounds = []
    order = random.Random(args.seed)
    for _ in range(args.rounds):
        names = list(fns)
        order.shuffle(names)  # no function always runs right after the same other one
        times = {name: timed(fns[name], args.threads, device) / samples for name in names}
        rounds.append({name: times[name] for name in fns})
    if reference is not None:
        warm_up(reference)
        pick = min if args.stat == "min" else statistics.median
        reference_cache[str(device)] = pick(
            timed(reference, args.threads, device) / samples for _ in range(args.rounds)
        )
    ref_time = reference_cache.get(str(device))
    if args.stat == "min":
        # Interference from other processes only ever adds time: the fastest round of each
        # function is the least disturbed one.
        med = {k: min(r[k] for r in rounds) for k in fns}
        efficiency = (med["no_exit"] / med["early_exit"]) / (c_n / mean_cost)
        overhead = med["no_exit"] / med["original"]
    else:
        med = {k: statistics.median(r[k] for r in rounds) for k in fns}
        efficiency = statistics.median(
            (r["no_exit"] / r["early_exit"]) / (c_n / mean_cost) for r in rounds
        )
        overhead = statistics.median(r["no_exit"] / r["original"] for r in rounds)
    return Row(
        device=str(device),
        batch_size=batch_size,
        threads=args.threads,
        compile=args.compile,
        channels_last=args.channels_last,
        amp=args.amp,
        pattern=args.pattern,
        mean_cost=mean_cost,
        c_n=c_n,
        exit_histogram=histogram,
        ms_per_sample_original=1e3 * med["original"],
        ms_per_sample_no_exit=1e3 * med["no_exit"],
        ms_per_sample_early_exit=1e3 * med["early_exit"],
        ms_per_sample_reference=None if ref_time is None else 1e3 * ref_time,
        efficiency=efficiency,
        overhead=overhead,
        speedup_vs_reference=None if ref_time is None else ref_time / med["early_exit"],
        rounds=rounds,
    )


@torch.inference_mode()
def profile_stages(args: argparse.Namespace, device: torch.device, batch_size: int) -> list[dict]:
    """Per stage and head on a full batch: share of the time against share of the MACs."""
    torch.manual_seed(args.seed)
    model = create_untrained(args)
    input_size = tuple(args.input_size) if args.input_size else None
    net = earlyexit.convert(
        model,
        n_exits=args.n_exits,
        dist=args.dist,
        exit_type=args.exit_type,
        input_size=input_size,
    )
    net = net.eval().to(device)
    x = torch.randn(batch_size, *net.input_size, device=device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    stages = net.stages()
    inputs, h = [], x
    for stage in stages:
        inputs.append(h)
        h = stage(h)
    rows = []
    total_macs = sum(net.stage_macs) + sum(net.head_macs)
    for i, stage in enumerate(stages):
        xi = inputs[i]
        stage_t = statistics.median(
            timed(lambda s=stage, xi=xi: s(xi), args.threads, device) for _ in range(args.rounds)
        )
        head_t = 0.0
        if i < len(net.heads):
            feat = stage(xi)
            head = net.heads[i]
            head_t = statistics.median(
                timed(lambda hd=head, f=feat: hd(f), args.threads, device)
                for _ in range(args.rounds)
            )
        rows.append(
            {
                "stage": i,
                "ends_after": net.exit_names[i] if i < net.num_exits else "(final exit)",
                "mac_share": net.stage_macs[i] / total_macs,
                "head_mac_share": (net.head_macs[i] / total_macs) if i < net.num_exits else 0.0,
                "stage_s": stage_t,
                "head_s": head_t,
            }
        )
    total_t = sum(r["stage_s"] + r["head_s"] for r in rows)
    for r in rows:
        r["time_share"] = r["stage_s"] / total_t
        r["head_time_share"] = r["head_s"] / total_t
        r["time_over_macs"] = r["time_share"] / r["mac_share"]
    return rows


def print_table(rows: Sequence[Row], header: bool = True) -> None:
    if header:
        print(
            f"{'device':<6} {'batch':>5} {'thr':>3} {'cost':>6} {'orig ms':>8} {'noexit ms':>9} "
            f"{'EE ms':>7} {'ref ms':>7} {'effic.':>7} {'overhead':>8} {'vs ref':>7}"
        )
    for r in rows:
        ref = "-" if r.ms_per_sample_reference is None else f"{r.ms_per_sample_reference:7.3f}"
        vs = "-" if r.speedup_vs_reference is None else f"{r.speedup_vs_reference:6.2f}x"
        print(
            f"{r.device:<6} {r.batch_size:>5} {r.threads:>3} {r.mean_cost:6.3f} "
            f"{r.ms_per_sample_original:8.3f} {r.ms_per_sample_no_exit:9.3f} "
            f"{r.ms_per_sample_early_exit:7.3f} {ref:>7} {r.efficiency:7.3f} {r.overhead:8.3f} "
            f"{vs:>7}"
        )


def plot_results(series: dict[str, Sequence[dict]], path: str) -> None:
    """Efficiency and overhead against batch size, one line per labelled set of rows.

    Args:
        series: label -> rows (`Row` as dicts, as in the JSON's `rows`).
        path: the image to write (matplotlib picks the format from the suffix).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for label, rows in series.items():
        rows = sorted(rows, key=lambda r: r["batch_size"])
        batches = [r["batch_size"] for r in rows]
        left.plot(batches, [r["efficiency"] for r in rows], marker="o", label=label)
        right.plot(batches, [r["overhead"] for r in rows], marker="o", label=label)
    left.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    left.set_title("efficiency: share of the MAC saving that becomes time", fontsize=9)
    right.set_title("overhead: no-exit early_exit / original model", fontsize=9)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    left.set_ylim(0, 1.2)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def group_rows(rows: Sequence[dict], gpu: str | None = None) -> dict[str, list[dict]]:
    """Rows (as dicts) grouped for plotting by device, threads and options."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = f"cpu, {r['threads']} thr" if r["device"] == "cpu" else gpu or r["device"]
        label += "".join(f", {o}" for o in ("compile", "channels_last", "amp") if r.get(o))
        series.setdefault(label, []).append(r)
    return series


def load_series(paths: Sequence[str | os.PathLike[str]]) -> dict[str, list[dict]]:
    """Rows of saved `--json` results, grouped as `group_rows` does, for plotting."""
    series: dict[str, list[dict]] = {}
    for path in paths:
        with open(path) as f:
            payload = json.load(f)
        for label, rows in group_rows(payload["rows"], payload.get("gpu")).items():
            series.setdefault(label, []).extend(rows)
    return series


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet110")
    p.add_argument("--n-exits", type=int, default=10)
    p.add_argument("--dist", default="pareto")
    p.add_argument(
        "--exit-type",
        default="conv",
        help="exit heads (default conv, the library's; the published tables used pool)",
    )
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    p.add_argument(
        "--pattern",
        default="uniform",
        help="uniform | none | first | halving | N+1 comma-separated shares",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--samples", type=int, default=256, help="samples per timed call")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--warmup", type=float, default=0.0, help="extra warm-up seconds per function")
    p.add_argument("--compile", action="store_true", help="torch.compile stages and the original")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, fp16 on CUDA)")
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument("--profile-stages", action="store_true", help="per-stage time vs MAC share")
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall: elapsed time; process: this process's CPU time (all threads), which other "
        "processes on a shared machine disturb less (use it with --threads 1)",
    )
    p.add_argument(
        "--malloc",
        choices=["tuned", "system"],
        default="tuned",
        help="tuned: keep freed memory in the heap (see tune_malloc); system: glibc defaults",
    )
    p.add_argument(
        "--stat",
        choices=["min", "median"],
        default="min",
        help="min: each function's fastest round (robust on a shared machine); median: the "
        "median over rounds of the per-round ratios",
    )
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="also draw efficiency and overhead vs batch size")
    p.add_argument(
        "--replot",
        nargs="+",
        metavar="JSON",
        help="measure nothing: draw saved --json results into --plot",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    global _clock
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PNG, the image to write")
        plot_results(load_series(args.replot), args.plot)
        print(f"wrote {args.plot}")
        return 0
    _clock = CLOCKS[args.clock]
    if args.malloc == "tuned" and not tune_malloc():
        args.malloc = "system (tuning failed: not glibc)"
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    devices = args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    shares = pattern_shares(args.pattern, args.n_exits)
    print(
        f"{args.model}, {args.n_exits} {args.dist} exits, pattern {args.pattern}, "
        f"torch {torch.__version__}, {args.threads} threads (torch.set_num_threads), "
        f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"load average {os.getloadavg()[0]:.2f}, {args.clock} clock, {args.malloc} malloc, "
        f"{args.stat} of {args.rounds} rounds, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
        f"{', compiled' if args.compile else ''}{', channels_last' if args.channels_last else ''}"
        f"{', amp' if args.amp else ''}",
        flush=True,
    )
    rows: list[Row] = []
    profiles: dict[str, list[dict]] = {}
    reference_cache: dict[str, float] = {}
    for dev in devices:
        device = torch.device(dev)
        for bs in args.batch_sizes:
            rows.append(measure(args, device, bs, shares, reference_cache))
            print_table(rows[-1:], header=len(rows) == 1)
            sys.stdout.flush()
        if args.profile_stages:
            bs = max(args.batch_sizes)
            profiles[dev] = profile_stages(args, device, bs)
            print(f"\nstages on {dev} at batch {bs}: share of time vs share of MACs")
            print(
                f"{'stage':>5} {'ends after':<16} {'MACs':>6} {'time':>6} {'ratio':>6} {'head':>6}"
            )
            for r in profiles[dev]:
                print(
                    f"{r['stage']:>5} {r['ends_after']:<16} {100 * r['mac_share']:5.1f}% "
                    f"{100 * r['time_share']:5.1f}% {r['time_over_macs']:6.2f} "
                    f"{100 * r['head_time_share']:5.2f}%"
                )
    if rows:
        print(f"\nexit histogram (last row): {rows[-1].exit_histogram}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "torch": torch.__version__,
            "cores": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "gpu": torch.cuda.get_device_name() if "cuda" in devices else None,
            "rows": [asdict(r) for r in rows],
            "stage_profiles": profiles,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    if args.plot and rows:
        gpu = torch.cuda.get_device_name() if "cuda" in devices else None
        plot_results(group_rows([asdict(r) for r in rows], gpu), args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
