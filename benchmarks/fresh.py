"""Each way of running a model timed alone in a fresh process, as a user's program runs it.

`speed.py` interleaves every method in one process, which is fair against noise but not
against the allocator. glibc maps a block at least as large as its mmap threshold straight
from the system and unmaps it when it is freed, and it trims the top of its heap once more
than its trim threshold lies free there; both thresholds rise with the largest mapped block
freed so far (the trim threshold to twice it). Memory that goes back to the system is
page-faulted in afresh when it is used again. So once a process has run whole batches, its
large freed blocks spare smaller, micro-batched activations those faults, while a program that
only ever runs micro-batches keeps low thresholds. This script times each method in processes
of its own (`--runs` of them per method), nothing else run before, and prints per method the
median over processes of each process's fastest call (and the range), with the minor page
faults per call. A call runs the whole stream of `--samples` inputs in batches of
`--batch-size`:

- `original`: the eager module as it is; `original_folded`: with the rewrites of the net's
  inference stages (`speed.fold_original`: batch norms folded, ReLUs and sums applied by
  the convolutions on CPU, in place); `original_micro`: that, on micro-batches of the size
  `net.micro_batch = "auto"` picks;
- `early_exit` / `no_exit`: `net.early_exit` on each batch with the forced exit pattern
  (`speed.py`'s) / with nobody leaving, with the library's defaults (whole batches);
  `early_exit_micro` / `no_exit_micro`: the same with `net.micro_batch = "auto"`;
- `predict` / `predict_no_exit`: `earlyexit.predict(net, batches, batch_size=batch_size)`
  over the stream, defaults.

The exit pattern is forced on micro-batches, so that no large batch runs before the timed
calls. After its timed calls, a process of `early_exit`, `early_exit_micro` or `predict` also
times each stage and exit head alone on the whole batch (on micro-batches for
`early_exit_micro`), with nobody leaving, as `speed.py` does for its *time ideal*: the time
per sample Σ_i r_i (s_i + h_i) if every stage ran at full batch and leaving cost nothing, with
r_i the share of samples that reach stage i. `time ideal ÷ the method's time` is then how much
of what the stages' own speeds allow the method reaches, apart from the MACs: at 32×32 the
first stages of a CIFAR ResNet take a larger share of the time than of the MACs, so that
leaving after them saves less time than MACs. `--json` writes the per-process results.

    python benchmarks/fresh.py --model resnet110 --n-exits 10 --batch-size 256 --runs 4
    python benchmarks/fresh.py --batch-size 16 --samples 256 --methods original_folded \
        early_exit no_exit predict predict_no_exit
    python benchmarks/fresh.py --methods no_exit early_exit --runs 3 --unfused   # the A/B
    python benchmarks/fresh.py --methods no_exit early_exit --runs 3 --unchained  # another
    python benchmarks/fresh.py --methods no_exit early_exit --runs 3 --no-workspace  # a third
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import earlyexit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed

METHODS = (
    "original",
    "original_folded",
    "original_micro",
    "early_exit",
    "no_exit",
    "early_exit_micro",
    "no_exit_micro",
    "predict",
    "predict_no_exit",
)
NEVER = 2.0  # a threshold above 1: nobody leaves early


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet110")
    p.add_argument("--n-exits", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--samples", type=int, help="inputs per call (default: one batch)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=4, help="fresh processes per method")
    p.add_argument("--calls", type=int, default=5, help="timed calls per process")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW")
    p.add_argument(
        "--unfused",
        action="store_true",
        help="without the ReLUs and sums done by the convolutions (earlyexit.fx._pointwise), "
        "in the net and in the rewritten original: the earlier release, for an A/B",
    )
    p.add_argument(
        "--unchained",
        action="store_true",
        help="every stage of the net leaves its input alone (inference_stages(), not "
        "inference_stages(chained=True)): the earlier release, for an A/B",
    )
    p.add_argument(
        "--no-workspace",
        action="store_true",
        help="every convolution temporary in fresh memory (no earlyexit.fx._workspace), in "
        "the net and in the rewritten original: the earlier release, for an A/B",
    )
    p.add_argument("--json", help="write the per-process results here")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    return p


def speed_args(args: argparse.Namespace) -> argparse.Namespace:
    argv = ["--model", args.model, "--n-exits", str(args.n_exits)]
    return speed.build_parser().parse_args(
        argv + ([] if args.no_channels_last else ["--channels-last"])
    )


def child(args: argparse.Namespace) -> dict:
    """One process, one method: its fastest call per sample and its page faults per call."""
    torch.set_num_threads(args.threads)
    if args.unfused:
        from earlyexit.fx import _pointwise, split

        def unchanged(stage):
            return stage

        split.fuse_pointwise = _pointwise.fuse_pointwise = unchanged
    if args.no_workspace:
        from earlyexit.fx import _inplace

        _inplace.assign_workspaces = lambda gm: 0
    net = speed.create_net(speed_args(args), torch.device("cpu"))
    if args.unchained:
        alone = net.staged.inference_stages
        net.staged.inference_stages = lambda chained=False: alone()
    layout = torch.contiguous_format if args.no_channels_last else torch.channels_last
    samples = args.samples or args.batch_size
    x = torch.randn(samples, *net.input_size, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=layout)
    micro = speed.auto_micro_batch(net, x) or args.batch_size
    shares = speed.pattern_shares("uniform", net.num_exits)
    with torch.inference_mode():
        speed.force_pattern(net, x, speed.apportion(shares, len(x)), chunk=micro)
    net.threshold = 0.5
    folded, _ = speed.fold_original(net.backbone)
    if args.child.endswith("_micro"):
        net.micro_batch = "auto"
    batches = list(x.split(args.batch_size))

    def stream(threshold: float | None = None):
        return earlyexit.predict(
            net, batches, batch_size=args.batch_size, threshold=threshold, progress=False
        )

    calls = {
        "original": lambda: [net.backbone(b) for b in batches],
        "original_folded": lambda: [folded(b) for b in batches],
        "original_micro": lambda: [folded(part) for b in batches for part in b.split(micro)],
        "early_exit": lambda: [net.early_exit(b) for b in batches],
        "no_exit": lambda: [net.early_exit(b, threshold=NEVER) for b in batches],
        "predict": stream,
        "predict_no_exit": lambda: stream(NEVER),
    }
    call = calls[args.child.removesuffix("_micro")]
    times, faults = [], []
    with torch.inference_mode():
        call()  # warm-up
        for _ in range(args.calls):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        exits = torch.cat([net.early_exit(b).exit_index for b in batches])
    histogram = torch.bincount(exits, minlength=net.num_exits + 1).tolist()
    ideal = None
    if args.child in TIME_IDEAL_METHODS:  # after the timed calls: they ran in a fresh process
        ideal = time_ideal_ms(net, batches, histogram, args, micro if net.micro_batch else None)
    return {
        "method": args.child,
        "ms_per_sample": 1e3 * min(times) / len(x),
        "faults_per_call": statistics.median(faults),
        "micro_batch": micro if micro < args.batch_size else None,  # of the micro methods
        "mean_cost": float(net.exit_costs[exits].mean()),
        "c_n": float(net.exit_costs[-1]),
        "exit_histogram": histogram,
        "time_ideal_ms": ideal,
        "fused_convolutions": _fused_convolutions(net),
        "stages_taking_their_input": _stages_taking_their_input(net),
        "workspace_convolutions": _workspace_convolutions(net),
    }


def _fused_convolutions(net: earlyexit.EarlyExitNet) -> int:
    """How many convolutions of the net's inference stages do their ReLU or sum themselves."""
    from earlyexit.fx._pointwise import fused_convolutions

    return len(fused_convolutions(net.staged.inference_stages()))


def _stages_taking_their_input(net: earlyexit.EarlyExitNet) -> int:
    """How many of the stages early exit runs may write into their input (see `--unchained`):
    those that differ from the stages that leave it alone."""
    alone, run = net.staged.inference_stages(), net._inference_stages(chained=True)
    return sum(a.code != r.code for a, r in zip(alone, run, strict=True))


def _workspace_convolutions(net: earlyexit.EarlyExitNet) -> int:
    """How many convolutions of the net's inference stages write into a per-call workspace
    (see `--no-workspace`)."""
    from earlyexit.fx._pointwise import FusedConv

    stages = net.staged.inference_stages()
    modules = [m for s in stages for m in s.modules()]
    return sum(isinstance(m, FusedConv) and m.slot is not None for m in modules)


TIME_IDEAL_METHODS = ("early_exit", "early_exit_micro", "predict")


def time_ideal_ms(
    net: earlyexit.EarlyExitNet,
    batches: list[torch.Tensor],
    histogram: list[int],
    args: argparse.Namespace,
    micro: int | None,
) -> float:
    """Σ_i r_i (s_i + h_i) in ms per sample: each stage and head alone, fastest of the calls."""
    pieces = speed.full_batch_pieces(net, batches[0], 1, False, contextlib.nullcontext, micro)
    fastest = {}
    for name, piece in pieces.items():
        piece()  # warm-up
        times = [speed.timed(piece, args.threads, torch.device("cpu")) for _ in range(args.calls)]
        fastest[name] = min(times) / len(batches[0])
    n = net.num_exits
    stage_s = [fastest[f"stage:{i}"] for i in range(n + 1)]
    head_s = [fastest[f"head:{i}"] for i in range(n)]
    return 1e3 * speed.ideal_time_per_sample(histogram, stage_s, head_s)


def run_fresh(argv: list[str], method: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--child", method],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(results: list[dict]) -> dict[str, dict]:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["method"], []).append(r)
    return {
        m: {
            "median": statistics.median(r["ms_per_sample"] for r in rs),
            "low": min(r["ms_per_sample"] for r in rs),
            "high": max(r["ms_per_sample"] for r in rs),
            "faults": statistics.median(r["faults_per_call"] for r in rs),
            "mean_cost": rs[0]["mean_cost"],
            "c_n": rs[0]["c_n"],
            "time_ideal": _median_or_none([r.get("time_ideal_ms") for r in rs]),
        }
        for m, rs in by.items()
    }


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def print_table(summary: dict[str, dict]) -> None:
    print(f"{'method':18} {'ms/sample':>9} {'range':>15} {'faults/call':>11}")
    for m, s in summary.items():
        span = f"{s['low']:.3f}-{s['high']:.3f}"
        print(f"{m:18} {s['median']:9.3f} {span:>15} {s['faults']:11.0f}")
    pairs = [("early_exit", "no_exit"), ("early_exit_micro", "no_exit_micro")]
    for method, nobody in [*pairs, ("predict", "predict_no_exit")]:
        e, n = summary.get(method), summary.get(nobody)
        if e and n:
            saved = speed.efficiency(n["median"] / e["median"], e["mean_cost"], e["c_n"])
            print(f"efficiency of {method} (medians): {saved:.3f}")
    for method, s in summary.items():
        if s["time_ideal"] is not None:
            share = s["time_ideal"] / s["median"]
            print(
                f"time ideal of {method}: {s['time_ideal']:.3f} ms/sample; the method reaches "
                f"{share:.3f} of it (medians)"
            )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    results = []  # the children take the same arguments (and ignore --json)
    for k in range(args.runs):
        for method in args.methods:  # alternate, so that drift spreads over the methods
            results.append(run_fresh(argv, method))
            print(f"run {k + 1}/{args.runs} {method}: {results[-1]['ms_per_sample']:.3f} ms/sample")
    summary = summarize(results)
    print_table(summary)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
