"""How fast is batched early-exit inference, compared with the original model and with its MACs?

For a converted model and a chosen *exit pattern* (the share of samples leaving at each exit),
over a range of batch sizes, this measures with `torch.utils.benchmark.Timer`:

- **efficiency** = (time of `early_exit` with no early exits ÷ time of `early_exit`) ÷
  (c_N ÷ mean cost): 1.0 means the wall-clock speed-up is exactly the MAC saving.
- **overhead** = time of `early_exit` with no early exits ÷ time of the baseline (below): what
  splitting into stages, the heads and the bookkeeping cost when nobody leaves early.
- **vs reference**: throughput of `early_exit` ÷ throughput of the reference implementation's
  loop, which runs each sample alone and checks `sigmoid(a).item() >= T` after each exit.

And, per method (`--methods`), against the *baseline*, the original model run the best way on
the device (same autocast and memory format as the other methods): on CPU the fastest, in that
run, of the eager module as it is, the module traced with the same rewrites as the stages
that inference runs (conv → batch norm pairs folded into single convolutions, ReLUs and
residual sums applied by the convolutions through oneDNN, temporaries written in place;
`fold_original`), and, when the net runs micro-batches (`--micro-batch`),
both on the same micro-batches; on CUDA the folded module captured in one
CUDA graph at the row's batch size. A model torch.fx cannot trace stays unfolded, with a note:

- `original`: the eager module as it is; `original_folded`: folded, eager; `original_micro`
  and `original_micro_as_is` (CPU, with `--micro-batch`, batches above the net's micro-batch):
  folded, and as it is, run on micro-batches of the size the net runs
  (`EarlyExitNet.micro_batch`);
  `original_graphs` (CUDA): the baseline there; `early_exit`: `net.early_exit` on each batch;
  `early_exit_graphs`: the runner of `earlyexit.capture_cuda_graphs(net, batch_size)`;
  `predict` and `predict_graphs`: `earlyexit.predict(net, batches, batch_size=batch_size,
  cuda_graphs=...)` over the whole stream. The graph methods need CUDA (skipped with a note
  elsewhere, and with `--compile`).
- **speed-up** = t_baseline ÷ t_method, times per sample.
- **MAC ideal** = 1 ÷ mean cost, the mean over samples of the relative cost (heads included) of
  the exit each left at in that method's run: the speed-up if time followed MACs.
- **time ideal** = t_baseline ÷ Σ_i r_i (s_i + h_i), where s_i and h_i are the times per sample
  of stage i and exit head i (h_N = 0) run alone on a full batch of the row's size, with no
  exits (CUDA graphs on CUDA, as the baseline; the stages that leave their input alone, as
  each runs many times on one input), and r_i the share of samples that reach stage i:
  the speed-up if every stage ran at full batch and compaction were free.
- **no-exit overhead** = t_method with nobody leaving (T above 1) ÷ t_baseline.
- **setup s**: the one-off CUDA graph capture, not part of the times.

`predict` with `cuda_graphs=True` captures its graphs on every call; here the runner is
captured once at the row's batch size and passed as `cuda_graphs=runner` to every call, so
that the times are those of a long stream (the capture time is in setup s). A stream of
`--samples` inputs ends with partial batches (predict flushes its queues): the more batches,
the closer predict gets to full batches everywhere.

How the pattern is made. The backbone and heads are untrained, so confidences mean nothing; the
pattern is forced instead. On a fixed set of random inputs (`--samples`, default 256, split into
batches of each size), `forward_all` gives every confidence branch's inputs. Each branch gets
seeded random weights along which those inputs vary (orthogonal to their mean, so that no large
offset cancels in half precision), scaled to a unit spread of its logit a_i, then its bias is
set so that, of the samples still running at exit i, exactly the chosen number have a_i >= 0
(h_i >= 0.5 = T): the bias goes midway between the two logits that separate leavers from
stayers (the inputs are random, so no two tie). The confidences stay a function of the
input, so which samples leave is decided by the data, as in a trained net, and the mix of exits
inside each batch is as random as the inputs. The achieved histogram is measured by
running `early_exit` and printed; the mean cost in the efficiency is the achieved one (with
`--amp` it can miss the target by a few samples: bfloat16 rounds the confidences coarsely).

Timings are interleaved (every function takes a turn in each round, in a shuffled order); by
default each function's fastest round is used (`--stat min`), since other processes only ever
add time, or else the medians over rounds of the per-round ratios (`--stat median`). Under
each row a line gives the overhead's and the efficiency's range and median over the rounds
(`--show` prints it for saved results too): where one function had one lucky round, the
ratio of fastest rounds moves by more than the per-round ratios do. On a
shared machine, `--clock process` times this process's CPU time instead of the wall clock, and
`--threads 1` avoids OpenMP threads spinning at barriers while a sibling thread is descheduled
(or set `OMP_WAIT_POLICY=PASSIVE`). By default the allocator is left as a user has it
(`--malloc system`); `--malloc tuned` (see `tune_malloc`) keeps freed memory in glibc's heap
first, which measures the library's own overhead apart from page faults: with glibc's defaults
activations are page-faulted in afresh, 15-40 % of a CPU forward pass of the original module;
the stages that inference runs write into their own temporaries where they can
(`earlyexit/fx/_inplace.py`), so they allocate, and fault, less than the original module. The
methods share this process's allocator state (`fresh.py` times each alone).

`--preset issue` runs ResNet-110 (32×32, 10 pareto exits), timm `resnet50` and
`deit_small_patch16_224` (224×224, 4 pareto exits each), uniform pattern, at batch 16 on CPU
(fp32) and on CUDA at 256 (ResNet-110) or 64 (the others) with bfloat16 autocast, the CNNs
channels_last on both (their faster layout there; the ViT has no convolutions to speak of);
it writes one JSON per model into `--json-dir`. A JSON is written again after each row, with
`"complete": false` until the run's last row is in, so a run stopped early keeps its rows.

    python benchmarks/speed.py --model resnet110 --n-exits 10 --batch-sizes 256 --threads 2
    python benchmarks/speed.py --batch-sizes 1 4 16 64 256 --pattern uniform --json speed.json
    python benchmarks/speed.py --batch-sizes 256 --profile-stages
    python benchmarks/speed.py --preset issue --devices cuda --json-dir results/
    python benchmarks/speed.py --replot a.json b.json --plot speed.png   # draw saved results
    python benchmarks/speed.py --show a.json b.json     # print saved results, rounds' spread
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
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import timm
import torch

# torch.utils.benchmark imports cpp_extension, which warns on machines without CUDA.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
from torch.utils.benchmark import Timer  # noqa: E402

import earlyexit  # noqa: E402
import earlyexit.stream  # noqa: E402

NEVER = 2.0  # a threshold above 1: no sample leaves early

#: What `--methods` can ask for. `original` and `early_exit` are always measured: the
#: efficiency and overhead columns need them.
METHODS = ("original", "early_exit", "predict", "early_exit_graphs", "predict_graphs")
GRAPH_METHODS = ("early_exit_graphs", "predict_graphs")
#: The order methods are listed in, the baselines (the original with its batch norms folded,
#: on CPU also on micro-batches, and on CUDA as one graph) included.
METHOD_ORDER = (
    "original_graphs",
    "original_micro",
    "original_micro_as_is",
    "original_folded",
    *METHODS,
)
#: The candidates for the CPU baseline: whichever of these ran fastest in a row.
CPU_BASELINES = ("original_micro", "original_micro_as_is", "original_folded", "original")
WIDTH = 100  # the printed tables and notes fit in this many columns


@dataclass(frozen=True)
class PresetModel:
    """One model of a `--preset`: how to build it and the batch size on each device type."""

    model: str
    n_exits: int
    num_classes: int
    input_size: tuple[int, int, int] | None
    cnn: bool  # channels_last, the faster layout for CNNs on both devices
    batch_size: dict[str, int]  # device type -> batch size


#: The issue's configurations: the dist is pareto and the pattern uniform for all.
PRESETS: dict[str, tuple[PresetModel, ...]] = {
    "issue": (
        PresetModel("resnet110", 10, 10, None, True, {"cpu": 16, "cuda": 256}),
        PresetModel("resnet50", 4, 1000, (3, 224, 224), True, {"cpu": 16, "cuda": 64}),
        PresetModel(
            "deit_small_patch16_224", 4, 1000, (3, 224, 224), False, {"cpu": 16, "cuda": 64}
        ),
    )
}
#: Batches per stream in a preset, unless `--samples` says otherwise: predict's partial
#: batches at the end of the stream weigh less in a longer one.
PRESET_BATCHES = {"cpu": 16, "cuda": 32}


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
def force_pattern(
    net: earlyexit.EarlyExitNet,
    x: torch.Tensor,
    counts: Sequence[int],
    chunk: int | None = None,
) -> None:
    """Set the confidence branches so that `counts[i]` samples of `x` leave at exit i (T=0.5).

    Each confidence branch gets seeded random weights along which the samples' inputs to it
    vary, orthogonal to their mean: untrained heads see nearly the same features for every
    sample (most of all a ViT's, averaged over its tokens), so a branch that read the mean
    would add a large offset and cancel it with its bias, and in half precision that
    cancellation leaves most samples tied. `counts` holds exactly in float32 for distinct
    samples; in half precision, where samples can still tie, about (the run reports the exits
    it measured).

    `chunk`: run `forward_all` on this many samples at a time (all at once when None). Run the
    net afterwards in an autocast region of its own: a region keeps the casts of the weights
    it made, so within this one the net would still see the old confidence branches.
    """
    was_training = net.training
    net.eval()
    inputs: list[list[torch.Tensor]] = [[] for _ in net.heads]

    def keep(i: int) -> Callable:
        return lambda module, args: inputs[i].append(args[0].detach().float())

    hooks = [head.confidence.register_forward_pre_hook(keep(i)) for i, head in enumerate(net.heads)]
    try:
        for part in x.split(chunk or x.shape[0]):
            net.forward_all(part)
    finally:
        for hook in hooks:
            hook.remove()
    generator = torch.Generator().manual_seed(0)
    remaining = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for i, head in enumerate(net.heads):
        z = torch.cat(inputs[i])
        mean = z.mean(dim=0)
        unit = mean / mean.norm().clamp_min(1e-12)
        w = torch.randn(z.shape[1], generator=generator).to(z.device)
        w -= (w @ unit) * unit
        a = (z - mean) @ w
        scale = a.std().clamp_min(1e-12)
        w, a = w / scale, a / scale
        values = a[remaining].sort(descending=True).values
        k = counts[i]
        if values.numel() == 0:  # all have left (ties in half precision): nobody is left
            bias = -(a.max() + 1.0)
        elif k == 0:
            bias = -(values[0] + 1.0)
        elif k >= values.numel():
            bias = -(values[-1] - 1.0)
        else:
            bias = -(values[k - 1] + values[k]) / 2
        # The branch computes z @ w + b = a + bias, with b = bias - mean @ w (nearly bias).
        head.confidence.weight.copy_(w.view_as(head.confidence.weight))
        head.confidence.bias.fill_(float(bias - mean @ w))
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


def reach_shares(histogram: Sequence[int]) -> list[float]:
    """r_i, the share of samples that run stage i: those that leave at exit i or later."""
    total = sum(histogram)
    if total <= 0:
        raise ValueError(f"Expected a histogram with at least one sample, got {list(histogram)}.")
    return [sum(histogram[i:]) / total for i in range(len(histogram))]


def ideal_time_per_sample(
    histogram: Sequence[int], stage_times: Sequence[float], head_times: Sequence[float]
) -> float:
    """Σ_i r_i (s_i + h_i): the time per sample if every stage ran at full batch.

    Args:
        histogram: how many samples left at each of the N+1 exits.
        stage_times: s_i, the time per sample of each of the N+1 stages on a full batch.
        head_times: h_i, the time per sample of each of the N exit heads on a full batch
            (the final exit's head is part of the last stage).

    Returns:
        The time per sample, in the unit of the times.
    """
    n = len(histogram)
    if len(stage_times) != n or len(head_times) != n - 1:
        raise ValueError(
            f"Expected {n} stage times and {n - 1} head times for a histogram of {n} exits, "
            f"got {len(stage_times)} and {len(head_times)}."
        )
    pieces = [s + h for s, h in zip(stage_times, [*head_times, 0.0], strict=True)]
    return sum(r * t for r, t in zip(reach_shares(histogram), pieces, strict=True))


def time_ideal(
    t_baseline: float,
    histogram: Sequence[int],
    stage_times: Sequence[float],
    head_times: Sequence[float],
) -> float:
    """The speed-up over the baseline if every stage ran at full batch and compaction were free.

    `t_baseline ÷ ideal_time_per_sample(histogram, stage_times, head_times)`, times per sample.
    """
    return t_baseline / ideal_time_per_sample(histogram, stage_times, head_times)


def mac_ideal(mean_cost: float) -> float:
    """The speed-up if time followed MACs: 1 ÷ the mean relative cost (heads included)."""
    return 1.0 / mean_cost


def efficiency(no_exit_speedup: float, mean_cost: float, c_n: float) -> float:
    """(no-exit time ÷ early-exit time) ÷ (c_N ÷ mean cost): the share of the MAC saving
    that became time."""
    return no_exit_speedup * mean_cost / c_n


@dataclass
class MethodResult:
    """One method's numbers in a row; times per sample, ratios against the row's baseline."""

    ms_per_sample: float
    speedup: float
    mean_cost: float | None = None  # of the exits its samples took; None for the originals
    exit_histogram: list[int] | None = None
    mac_ideal: float | None = None
    time_ideal: float | None = None
    ms_per_sample_no_exit: float | None = None  # with T above 1: nobody leaves early
    overhead: float | None = None  # no-exit time ÷ baseline time
    setup_s: float | None = None  # one-off CUDA graph capture, outside the times


@dataclass
class Row:
    """One measured configuration.

    The fields after `rounds` came with the per-method comparison; rows saved before it load
    with their defaults.
    """

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
    model: str | None = None
    amp_dtype: str | None = None
    baseline: str = "original"  # the method the speed-ups divide
    mac_ideal: float | None = None  # of early_exit's exits
    time_ideal: float | None = None  # of early_exit's exits
    stage_timing: str | None = None  # how the stages were timed: "eager" or "cuda_graphs"
    stage_ms_per_sample: list[float] = field(default_factory=list)  # s_i, full batch
    head_ms_per_sample: list[float] = field(default_factory=list)  # h_i, full batch
    methods: dict[str, MethodResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    micro_batch: int | None = None  # the samples per stage call of CPU inference; None: all

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        """A row from its saved dict (`asdict`), old or new."""
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        methods = {k: MethodResult(**v) for k, v in (d.pop("methods", None) or {}).items()}
        return cls(**d, methods=methods)


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


def device_clock(device: torch.device) -> Callable[[], float]:
    """The clock (`--clock`), read after the device has finished the work queued on it.

    On CUDA a call returns once its kernels are queued; a clock that does not wait for them
    times the launches, not the work (`Timer`'s own default clock waits; one passed to it
    does not, so it has to).
    """
    clock = _clock
    if device.type != "cuda":
        return clock

    def synchronized() -> float:
        torch.cuda.synchronize(device)
        return clock()

    return synchronized


def timed(fn: Callable[[], object], threads: int, device: torch.device) -> float:
    """Seconds for one call of `fn` (after `Timer`'s two untimed calls), its work on the
    device included, under the thread setting."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=threads, timer=device_clock(device))
    return timer.timeit(1).median


def warm_up(
    fn: Callable[[], object], seconds: float = 0.0, device: torch.device | None = None
) -> None:
    """Call `fn` once, then again until `seconds` more have passed, each time until its work
    on `device` is done."""
    clock = device_clock(device or torch.device("cpu"))
    fn()
    start = clock()
    while clock() - start < seconds:
        fn()


def amp_dtype_name(device: torch.device, amp: bool, amp_dtype: str | None = None) -> str | None:
    """The autocast dtype: `amp_dtype`, else bfloat16 on CPU and float16 on CUDA."""
    if not amp:
        return None
    return amp_dtype or ("bfloat16" if device.type == "cpu" else "float16")


def autocast(device: torch.device, amp: bool, amp_dtype: str | None = None, cache: bool = True):
    """Autocast as the run asks (`cache=False` for CUDA graph captures, which need it off)."""
    dtype = amp_dtype_name(device, amp, amp_dtype)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype), cache_enabled=cache)


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


def create_net(args: argparse.Namespace, device: torch.device) -> earlyexit.EarlyExitNet:
    """The untrained model, converted, in eval mode on `device` (channels_last if asked)."""
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
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if getattr(args, "micro_batch", "default") != "default":
        net.micro_batch = args.micro_batch
    return net


def auto_micro_batch(net: earlyexit.EarlyExitNet, x: torch.Tensor) -> int | None:
    """The micro-batch `net.micro_batch = "auto"` would run `x` at (None off the CPU)."""
    saved = net.micro_batch
    net.micro_batch = "auto"
    try:
        return net.resolve_micro_batch(x)
    finally:
        net.micro_batch = saved


def parse_micro_batch(text: str) -> int | str | None:
    """`--micro-batch`: "auto", "none" or a positive int ("default": leave the net's)."""
    if text in ("auto", "none", "default"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected "auto", "none" or a positive int, got {text!r}')
    return value


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def graphs_unavailable(device: torch.device, args: argparse.Namespace) -> str | None:
    """Why CUDA graphs are not measured on `device`, or None when they are."""
    if device.type != "cuda":
        return f"CUDA graphs need a CUDA device, this is {device}"
    if args.compile:
        return "CUDA graphs of compiled stages are not measured (--compile)"
    return None


def capture_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` captured as one CUDA graph, after warm-up runs on a side stream; returns its replay.

    Call it under the autocast the graph should replay (without autocast's cast cache).
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # cuDNN's algorithm search and other lazy set-up stay out of it
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay() -> object:
        graph.replay()
        return out  # the graph's own output buffers: kept alive as long as the replay

    return replay


def capture_runner(
    net: earlyexit.EarlyExitNet, batch_sizes: int | Sequence[int]
) -> earlyexit.cuda_graphs.GraphedEarlyExit:
    """`earlyexit.capture_cuda_graphs` (a name the tests point at an eager stand-in)."""
    return earlyexit.capture_cuda_graphs(net, batch_sizes)


def graph_original(
    model: Callable[[torch.Tensor], object], example: torch.Tensor
) -> Callable[[torch.Tensor], object]:
    """The original model as one CUDA graph at the shape, dtype and memory format of `example`.

    Each call copies a batch into the graph's input buffer and replays the graph.
    """
    static = example.clone()  # keeps the memory format
    replay = capture_graph(lambda: model(static))

    def run(x: torch.Tensor) -> object:
        static.copy_(x)
        return replay()

    return run


def full_batch_pieces(
    net: earlyexit.EarlyExitNet,
    x: torch.Tensor,
    repeats: int,
    graphs: bool,
    context: Callable[[], contextlib.AbstractContextManager],
    micro: int | None = None,
) -> dict[str, Callable[[], None]]:
    """Each stage (`stage:i`) and exit head (`head:i`) alone on the full batch `x`, no exits.

    The inputs are the outputs of the stage before on `x`. Each function runs its piece
    `repeats` times (as many as the stream has batches), eagerly or as a CUDA graph; with
    `micro`, on micro-batches of that size, as CPU inference runs them.
    """
    # The stages that leave their input alone: each piece runs many times on one input.
    stages, heads = net._inference_stages(), net._inference_heads()
    calls: dict[str, Callable[[], object]] = {}

    def each(module: Callable[[torch.Tensor], object], h: torch.Tensor) -> Callable[[], object]:
        if micro is None or micro >= h.shape[0]:
            return lambda: module(h)
        parts = h.split(micro)
        return lambda: [module(part) for part in parts]

    with torch.inference_mode(), context():
        h = x
        for i, stage in enumerate(stages):
            calls[f"stage:{i}"] = each(stage, h)
            h = stage(h)
            if i < len(heads):
                calls[f"head:{i}"] = each(heads[i], h)
        if graphs:
            calls = {name: capture_graph(call) for name, call in calls.items()}

    def repeat(call: Callable[[], object]) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode(), context():
                for _ in range(repeats):
                    call()

        return go

    return {name: repeat(call) for name, call in calls.items()}


def no_exit_key(method: str) -> str:
    """The rounds' key of a method's run with nobody leaving early."""
    return "no_exit" if method == "early_exit" else f"{method}:no_exit"


def key(name: str) -> Callable[[dict[str, float]], float]:
    """The time of one function in a dict of times (a round's, or the summary's)."""
    return lambda times: times[name]


class Summary:
    """The rounds' times, summarised by `--stat`.

    `min`: interference from other processes only ever adds time, so each function's fastest
    round is its least disturbed one, and a ratio is that of the fastest rounds. `median`: the
    median time, and a ratio is the median over rounds of the per-round ratios.
    """

    def __init__(self, rounds: Sequence[dict[str, float]], stat: str) -> None:
        self.rounds = list(rounds)
        self.stat = stat
        self.pick = min if stat == "min" else statistics.median
        self.times = {k: self.pick(r[k] for r in self.rounds) for k in self.rounds[0]}

    def ratio(
        self, num: Callable[[dict[str, float]], float], den: Callable[[dict[str, float]], float]
    ) -> float:
        """num ÷ den, functions of a dict of times."""
        if self.stat == "min":
            return num(self.times) / den(self.times)
        return statistics.median(num(r) / den(r) for r in self.rounds)


def fold_original(model: torch.nn.Module) -> tuple[torch.nn.Module, str | None]:
    """The model traced as one stage, with the rewrites the net's inference stages get.

    Batch norms folded into the convolutions before them (`earlyexit.fx._fold`), ReLUs and
    residual sums applied by the convolutions on CPU (`earlyexit.fx._pointwise`),
    temporaries written in place (`earlyexit.fx._inplace`): so the baseline gains from them
    what the net gains. It shares the model's parameters and must run in eval mode.

    Returns the rewritten module and None, or the model itself and why it could not be traced.
    """
    from earlyexit.fx._fold import fold_batchnorm
    from earlyexit.fx._inplace import rewrite_inplace
    from earlyexit.fx._pointwise import fuse_pointwise

    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as err:  # any model torch.fx cannot trace
        return model, f"torch.fx could not trace it ({type(err).__name__})"
    traced.train(model.training)
    return rewrite_inplace(fuse_pointwise(fold_batchnorm(traced))), None


def compare_methods(
    summary: Summary,
    baseline: str,
    exits: dict[str, torch.Tensor],
    costs: torch.Tensor,
    setup: dict[str, float],
) -> dict[str, MethodResult]:
    """Each timed method against the baseline, in `METHOD_ORDER`.

    Args:
        summary: the rounds' times per sample: one key per method, `no_exit_key(method)` for
            the methods in `exits`, and `stage:i` / `head:i` for the full-batch pieces.
        baseline: the method the speed-ups divide.
        exits: method -> the exit index of every sample in its run (the early-exit methods).
        costs: the N+1 relative exit costs.
        setup: method -> seconds of its one-off capture.
    """
    n = costs.numel() - 1
    stage_keys = [f"stage:{i}" for i in range(n + 1)]
    head_keys = [f"head:{i}" for i in range(n)]

    def ideal(histogram: list[int]) -> Callable[[dict[str, float]], float]:
        return lambda times: ideal_time_per_sample(
            histogram, [times[k] for k in stage_keys], [times[k] for k in head_keys]
        )

    results: dict[str, MethodResult] = {}
    for method in METHOD_ORDER:
        if method not in summary.times:
            continue
        result = MethodResult(
            ms_per_sample=1e3 * summary.times[method],
            speedup=summary.ratio(key(baseline), key(method)),
            setup_s=setup.get(method),
        )
        if method in exits:
            index = exits[method].cpu()
            result.exit_histogram = torch.bincount(index, minlength=n + 1).tolist()
            result.mean_cost = float(costs[index].mean())
            result.mac_ideal = mac_ideal(result.mean_cost)
            result.time_ideal = summary.ratio(key(baseline), ideal(result.exit_histogram))
            result.ms_per_sample_no_exit = 1e3 * summary.times[no_exit_key(method)]
            result.overhead = summary.ratio(key(no_exit_key(method)), key(baseline))
        results[method] = result
    return results


def measure(
    args: argparse.Namespace,
    device: torch.device,
    batch_size: int,
    shares: list[float],
    reference_cache: dict[str, float],
) -> Row:
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # where the graphs' side streams are made
    net = create_net(args, device)
    size = net.input_size
    samples = batch_size * max(1, math.ceil(args.samples / batch_size))
    gen = torch.Generator().manual_seed(args.seed)
    data = torch.randn(samples, *size, generator=gen).to(device)
    if args.channels_last:
        data = data.contiguous(memory_format=torch.channels_last)

    def eager() -> contextlib.AbstractContextManager:
        return autocast(device, args.amp, args.amp_dtype)

    def graphed() -> contextlib.AbstractContextManager:
        return autocast(device, args.amp, args.amp_dtype, cache=False)

    with eager():  # the pattern holds for the numerics that are timed
        force_pattern(net, data, apportion(shares, samples), chunk=batch_size)
    net.threshold = 0.5
    batches = list(data.split(batch_size))
    original: Callable[[torch.Tensor], object] = net.backbone
    notes = []
    # The best eager original: rewritten as the stages that inference runs are (batch norms
    # folded, ReLUs and sums fused into the convolutions on CPU, in place).
    best, why_not_folded = fold_original(net.backbone)
    if why_not_folded:
        notes.append(f"the baseline's batch norms are not folded: {why_not_folded}.")
    if args.compile:
        net.compile()
        original = best = torch.compile(net.backbone, dynamic=True)

    wanted = {"original", "early_exit", *args.methods}
    why_not = graphs_unavailable(device, args)
    graphs = why_not is None
    if not graphs:
        skipped = [m for m in GRAPH_METHODS if m in wanted]
        if skipped:
            notes.append(f"{' and '.join(skipped)} skipped: {why_not}.")
        wanted -= set(GRAPH_METHODS)
    folded = best is not original
    baseline = "original_graphs" if graphs else "original"

    def run(
        fn: Callable[[torch.Tensor], object],
        context: Callable[[], contextlib.AbstractContextManager] = eager,
    ) -> Callable[[], None]:
        def go() -> None:
            with torch.inference_mode(), context():
                for b in batches:
                    fn(b)

        return go

    def exits_of(
        fn: Callable[[torch.Tensor], earlyexit.EarlyExitResult],
        context: Callable[[], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        with torch.inference_mode(), context():
            return torch.cat([fn(b).exit_index for b in batches])

    fns: dict[str, Callable[[], object]] = {
        "original": run(original),
        "no_exit": run(lambda b: net.early_exit(b, threshold=NEVER)),
        "early_exit": run(net.early_exit),
    }
    if folded:
        fns["original_folded"] = run(best)
    # With `--micro-batch`, the net runs large CPU batches in micro-batches, and so may the
    # original. Only then: in this one process, whole-batch runs free large blocks, which
    # keeps glibc from page-faulting smaller ones, a favour a program that only runs
    # micro-batches never gets (`fresh.py` times each way in a process of its own).
    micro = None if graphs else net.resolve_micro_batch(batches[0])
    if micro is not None and micro >= batch_size:
        micro = None  # one batch is one micro-batch
    if micro is not None:
        fns["original_micro"] = run(lambda b: [best(part) for part in b.split(micro)])
        if folded:
            fns["original_micro_as_is"] = run(lambda b: [original(part) for part in b.split(micro)])
        notes.append(f"CPU inference ran micro-batches of {micro} (`net.micro_batch`).")
    exits = {"early_exit": exits_of(net.early_exit, eager)}
    setup: dict[str, float] = {}
    if graphs:
        start = time.perf_counter()
        with torch.inference_mode(), graphed():
            original_graph = graph_original(best, batches[0])
        synchronize(device)
        setup["original_graphs"] = time.perf_counter() - start
        fns["original_graphs"] = run(original_graph, graphed)
    if "early_exit_graphs" in wanted:
        start = time.perf_counter()
        with torch.inference_mode(), graphed():
            runner = capture_runner(net, batch_size)
        synchronize(device)
        setup["early_exit_graphs"] = time.perf_counter() - start
        fns["early_exit_graphs"] = run(runner, graphed)
        fns["early_exit_graphs:no_exit"] = run(lambda b: runner(b, threshold=NEVER), graphed)
        exits["early_exit_graphs"] = exits_of(runner, graphed)
    for method in ("predict", "predict_graphs"):
        if method not in wanted:
            continue
        cuda_graphs: bool | earlyexit.GraphedEarlyExit = False
        if method == "predict_graphs":
            # Captured once at the stream's batch size and given to every call, as a long
            # stream (or a service calling predict again and again) would.
            start = time.perf_counter()
            with torch.inference_mode(), graphed():
                cuda_graphs = capture_runner(net, (batch_size,))
            synchronize(device)
            setup["predict_graphs"] = time.perf_counter() - start

        def stream(threshold: float | None = None, cuda_graphs=cuda_graphs):
            def go() -> earlyexit.Prediction:
                with (graphed if cuda_graphs is not False else eager)():
                    return earlyexit.predict(
                        net,
                        batches,
                        batch_size=batch_size,
                        threshold=threshold,
                        progress=False,
                        cuda_graphs=cuda_graphs,
                    )

            return go

        fns[method] = stream()
        fns[no_exit_key(method)] = stream(NEVER)
        exits[method] = fns[method]().exit_index
    # s_i and h_i of the time ideal, timed as the baseline runs: graphs on CUDA
    fns.update(
        full_batch_pieces(
            net, batches[0], len(batches), graphs, graphed if graphs else eager, micro
        )
    )

    stages, heads = net.stages(), list(net.heads)
    reference = None
    if args.reference and str(device) not in reference_cache:
        # The reference runs sample by sample: its speed does not depend on the batch size.
        reference = run(lambda b: reference_early_exit(stages, heads, b, net.threshold))
    for fn in fns.values():
        warm_up(fn, args.warmup, device)
    rounds = []
    order = random.Random(args.seed)
    for _ in range(args.rounds):
        names = list(fns)
        order.shuffle(names)  # no function always runs right after the same other one
        times = {name: timed(fns[name], args.threads, device) / samples for name in names}
        rounds.append({name: times[name] for name in fns})
    summary = Summary(rounds, args.stat)
    if not graphs:  # the best way on this device is whichever was faster here
        candidates = [m for m in CPU_BASELINES if m in fns]
        baseline = min(candidates, key=lambda m: summary.times[m])
    if reference is not None:
        warm_up(reference, device=device)
        reference_cache[str(device)] = summary.pick(
            timed(reference, args.threads, device) / samples for _ in range(args.rounds)
        )
    ref_time = reference_cache.get(str(device))
    med, ratio = summary.times, summary.ratio
    costs = net.exit_costs.cpu()
    exit_index = exits["early_exit"].cpu()
    histogram = torch.bincount(exit_index, minlength=net.num_exits + 1).tolist()
    mean_cost = float(costs[exit_index].mean())
    c_n = float(costs[-1])
    saved = efficiency(ratio(key("no_exit"), key("early_exit")), mean_cost, c_n)
    overhead = ratio(key("no_exit"), key(baseline))
    results = compare_methods(summary, baseline, exits, costs, setup)
    notes += [
        f"{name}'s exits differ from early_exit's: {m.exit_histogram}."
        for name, m in results.items()
        if m.exit_histogram is not None and m.exit_histogram != histogram
    ]
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
        efficiency=saved,
        overhead=overhead,
        micro_batch=micro,
        speedup_vs_reference=None if ref_time is None else ref_time / med["early_exit"],
        rounds=rounds,
        model=args.model,
        amp_dtype=amp_dtype_name(device, args.amp, args.amp_dtype),
        baseline=baseline,
        mac_ideal=results["early_exit"].mac_ideal,
        time_ideal=results["early_exit"].time_ideal,
        stage_timing="cuda_graphs" if graphs else "eager",
        stage_ms_per_sample=[1e3 * med[f"stage:{i}"] for i in range(net.num_exits + 1)],
        head_ms_per_sample=[1e3 * med[f"head:{i}"] for i in range(net.num_exits)],
        methods=results,
        notes=notes,
    )


@torch.inference_mode()
def profile_stages(args: argparse.Namespace, device: torch.device, batch_size: int) -> list[dict]:
    """Per stage and head on a full batch: share of the time against share of the MACs."""
    net = create_net(args, device)
    x = torch.randn(batch_size, *net.input_size, device=device)
    if args.channels_last:
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


def _cell(value: float | None, spec: str, width: int, suffix: str = "") -> str:
    text = "-" if value is None else f"{value:{spec}}{suffix}"
    return f"{text:>{width}}"


def format_methods(row: Row) -> list[str]:
    """The per-method lines printed under a row (none for rows without methods)."""
    if not row.methods:
        return []
    lines = [
        f"  {'method':<18} {'ms/sample':>10} {'speed-up':>8} {'MAC ideal':>9} "
        f"{'time ideal':>10} {'no-exit ms':>10} {'overhead':>8} {'setup s':>7}"
    ]
    for name, m in row.methods.items():
        label = name + ("*" if name == row.baseline else "")
        lines.append(
            f"  {label:<18} {_cell(m.ms_per_sample, '.4f', 10)} {_cell(m.speedup, '.2f', 8, 'x')} "
            f"{_cell(m.mac_ideal, '.2f', 9, 'x')} {_cell(m.time_ideal, '.2f', 10, 'x')} "
            f"{_cell(m.ms_per_sample_no_exit, '.4f', 10)} {_cell(m.overhead, '.3f', 8)} "
            f"{_cell(m.setup_s, '.2f', 7)}"
        )
    pieces = sum(row.stage_ms_per_sample) + sum(row.head_ms_per_sample)
    base = row.methods[row.baseline].ms_per_sample if row.baseline in row.methods else None
    share = f" = {pieces / base:.3f} x {row.baseline}" if base else ""
    text = (
        f"* baseline. Stages and heads alone at full batch ({row.stage_timing}): "
        f"{pieces:.4f} ms/sample{share}."
    )
    notes = [text, *(f"Note: {n}" for n in row.notes)]
    for note in notes:
        lines.extend(textwrap.wrap(note, WIDTH, initial_indent="  ", subsequent_indent="    "))
    return lines


def round_ratios(row: Row) -> dict[str, list[float]]:
    """Per timing round of the row: the no-exit overhead (no_exit ÷ baseline) and the
    efficiency of `early_exit`, the values whose medians `--stat median` reports. Rounds
    that lack one of the times are left out."""
    needed = ("no_exit", "early_exit", row.baseline)
    rounds = [r for r in row.rounds if all(k in r for k in needed)]
    return {
        "overhead": [r["no_exit"] / r[row.baseline] for r in rounds],
        "efficiency": [
            efficiency(r["no_exit"] / r["early_exit"], row.mean_cost, row.c_n) for r in rounds
        ],
    }


def format_rounds(row: Row) -> list[str]:
    """The line printed under a row: how its overhead and efficiency spread over the rounds
    (none for a row without rounds). A single process's ratio moves from round to round; a
    target met by the row's figure and missed by most of its rounds is met by luck."""
    ratios = round_ratios(row)
    if not ratios["overhead"]:
        return []
    parts = [
        f"{name} {min(values):.3f}-{max(values):.3f}, median {statistics.median(values):.3f}"
        for name, values in ratios.items()
    ]
    text = f"Per round ({len(ratios['overhead'])}): {'; '.join(parts)}."
    return textwrap.wrap(text, WIDTH, initial_indent="  ", subsequent_indent="    ")


def show_saved(paths: Sequence[str]) -> None:
    """Print saved `--json` results as a run prints them, each row with its rounds' spread."""
    for path in paths:
        rows = load_rows(path)
        print(f"{Path(path).name}: {len(rows)} row{'s' * (len(rows) != 1)}")
        for i, row in enumerate(rows):
            print_table([row], header=i == 0)
            for line in [*format_methods(row), *format_rounds(row)]:
                print(line)


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
    right.set_title("overhead: no-exit early_exit / original model (baseline)", fontsize=9)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    top = max((r["efficiency"] for rows in series.values() for r in rows), default=1.0)
    left.set_ylim(0, max(1.2, 1.1 * top))
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def speedups_of(row: dict) -> dict[str, float]:
    """Method -> speed-up over the row's baseline, from a saved row.

    Rows saved before the per-method comparison give early_exit over the eager original.
    """
    if row.get("methods"):
        return {name: m["speedup"] for name, m in row["methods"].items()}
    if "ms_per_sample_original" in row and "ms_per_sample_early_exit" in row:
        return {
            "original": 1.0,
            "early_exit": row["ms_per_sample_original"] / row["ms_per_sample_early_exit"],
        }
    return {}


def ideals_of(row: dict) -> dict[str, float | None]:
    """The row's MAC and time ideals (of early_exit's exits); None where it has none."""
    mac = row.get("mac_ideal")
    if mac is None and row.get("mean_cost"):
        mac = mac_ideal(row["mean_cost"])
    return {"MAC ideal": mac, "time ideal": row.get("time_ideal")}


def plot_speedups(series: dict[str, Sequence[dict]], path: str) -> bool:
    """Speed-up over the baseline against batch size, per method, with the ideals dashed.

    One panel per labelled set of rows. Returns False, writing nothing, when no row has a
    speed-up to draw.
    """
    panels = {label: rows for label, rows in series.items() if any(map(speedups_of, rows))}
    if not panels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(panels))
    grid = (math.ceil(len(panels) / cols), cols)
    fig, axes = plt.subplots(*grid, figsize=(5 * cols, 3.8 * grid[0]), dpi=120, squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (label, rows) in zip(axes.flat, panels.items()):
        rows = sorted(rows, key=lambda r: r["batch_size"])
        names = [m for m in METHOD_ORDER if any(m in speedups_of(r) for r in rows)]
        for name in names:
            points = [
                (r["batch_size"], speedups_of(r)[name]) for r in rows if name in speedups_of(r)
            ]
            ax.plot(*zip(*points, strict=True), marker="o", label=name)
        for which, color in (("MAC ideal", "black"), ("time ideal", "tab:red")):
            points = [(r["batch_size"], ideals_of(r)[which]) for r in rows]
            points = [(b, v) for b, v in points if v is not None]
            if points:
                # The marker shows an ideal measured at a single batch size, too.
                ax.plot(
                    *zip(*points, strict=True),
                    color=color,
                    lw=1,
                    ls="--",
                    marker="_",
                    markersize=14,
                    label=which,
                )
        ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        baselines = sorted({r.get("baseline", "original") for r in rows})
        ax.set_title(f"{label}: speed-up over {' / '.join(baselines)}", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("speed-up (times per sample)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def speedup_path(path: str | os.PathLike[str]) -> str:
    """Where the speed-up figure goes, beside `--plot`'s: `<name>-speedup.<suffix>`."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-speedup{p.suffix}"))


def model_path(path: str | os.PathLike[str], model: str) -> str:
    """A preset's figure for one model: `<name>-<model>.<suffix>`."""
    p = Path(path)
    return str(p.with_name(f"{p.stem}-{model}{p.suffix}"))


def group_rows(rows: Sequence[dict], gpu: str | None = None) -> dict[str, list[dict]]:
    """Rows (as dicts) grouped for plotting by model, device, threads and options."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        label = f"cpu, {r['threads']} thr" if r["device"] == "cpu" else gpu or r["device"]
        if r.get("model"):
            label = f"{r['model']}, {label}"
        label += "".join(f", {o}" for o in ("compile", "channels_last", "amp") if r.get(o))
        if r.get("amp") and r.get("amp_dtype"):
            label += f" {r['amp_dtype']}"
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


def load_rows(path: str | os.PathLike[str]) -> list[Row]:
    """The rows of a saved `--json` result, old or new, as `Row`s."""
    with open(path) as f:
        return [Row.from_dict(r) for r in json.load(f)["rows"]]


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
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"what to time: {', '.join(METHODS)} (default: all); original and early_exit "
        "always are, the other columns need them; the graph methods need CUDA and are skipped "
        "with a note elsewhere",
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="issue: ResNet-110, resnet50 and deit_small_patch16_224 at the issue's batch sizes, "
        "one JSON per model into --json-dir (sets the model, exits, pattern, batch sizes, "
        "autocast and memory format)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="samples per timed call (default 256; with --preset, 16 batches on CPU and 32 on "
        "CUDA)",
    )
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--warmup", type=float, default=0.0, help="extra warm-up seconds per function")
    p.add_argument("--compile", action="store_true", help="torch.compile stages and the original")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--micro-batch",
        type=parse_micro_batch,
        default="default",
        help='`net.micro_batch` for CPU inference: "auto", a positive int, or "none" for whole '
        "batches; the library's default (whole batches) when not given",
    )
    p.add_argument("--amp", action="store_true", help="autocast (bfloat16 on CPU, fp16 on CUDA)")
    p.add_argument(
        "--amp-dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="the autocast dtype, instead of the device's default",
    )
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
        default="system",
        help="system (default): the allocator as a user has it; tuned: keep freed memory in "
        "the heap (see tune_malloc), to measure the library's own overhead apart",
    )
    p.add_argument(
        "--stat",
        choices=["min", "median"],
        default="min",
        help="min: each function's fastest round (robust on a shared machine); median: the "
        "median over rounds of the per-round ratios",
    )
    p.add_argument("--json", metavar="PATH")
    p.add_argument(
        "--json-dir",
        metavar="DIR",
        help="write speed-<model>.json here (one per model with --preset)",
    )
    p.add_argument(
        "--plot",
        metavar="PNG",
        help="also draw efficiency and overhead vs batch size, and the speed-ups into "
        "<name>-speedup.png (with --preset: <name>-<model>.png and <name>-<model>-speedup.png)",
    )
    p.add_argument(
        "--replot",
        nargs="+",
        metavar="JSON",
        help="measure nothing: draw saved --json results into --plot",
    )
    p.add_argument(
        "--show",
        nargs="+",
        metavar="JSON",
        help="measure nothing: print saved --json results, each row with how its overhead "
        "and efficiency spread over its timing rounds",
    )
    p.add_argument("--seed", type=int, default=0)
    return p


def preset_args(
    args: argparse.Namespace, entry: PresetModel, device: torch.device
) -> argparse.Namespace:
    """The options of one preset model on one device: the rest of `args`, overridden."""
    if device.type not in entry.batch_size:
        raise SystemExit(f"--preset has batch sizes for {sorted(entry.batch_size)}, not {device}")
    batch = entry.batch_size[device.type]
    cuda = device.type == "cuda"
    return argparse.Namespace(
        **{
            **vars(args),
            "model": entry.model,
            "n_exits": entry.n_exits,
            "dist": "pareto",
            "pattern": "uniform",
            "num_classes": entry.num_classes,
            "input_size": list(entry.input_size) if entry.input_size else None,
            "batch_sizes": [batch],
            "samples": args.samples or PRESET_BATCHES[device.type] * batch,
            "amp": cuda,
            "amp_dtype": "bfloat16" if cuda else None,
            "channels_last": entry.cnn,
            "reference": False,
            "profile_stages": False,
        }
    )


def describe(args: argparse.Namespace, device: torch.device) -> str:
    """The line printed before a model's rows on a device: what runs, and how it is timed."""
    amp = amp_dtype_name(device, args.amp, args.amp_dtype)
    text = (
        f"{args.model} on {device}, {args.n_exits} {args.dist} exits, pattern {args.pattern}, "
        f"{args.samples} samples per call, torch {torch.__version__}, {args.threads} threads "
        f"(torch.set_num_threads), {os.cpu_count()} cores, "
        f"{platform.processor() or platform.machine()}, load average "
        f"{os.getloadavg()[0]:.2f}, {args.clock} clock, {args.malloc} malloc, {args.stat} of "
        f"{args.rounds} rounds, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
        f"{', compiled' if args.compile else ''}{', channels_last' if args.channels_last else ''}"
        f"{f', {amp} autocast' if amp else ''}"
    )
    return textwrap.fill(text, WIDTH, subsequent_indent="  ")


def gpu_name(runs: Sequence[tuple[torch.device, argparse.Namespace]]) -> str | None:
    return torch.cuda.get_device_name() if any(d.type == "cuda" for d, _ in runs) else None


def save_json(
    path: str,
    runs: Sequence[tuple[torch.device, argparse.Namespace]],
    rows: Sequence[Row],
    profiles: dict[str, list[dict]],
    extra: dict | None,
    complete: bool,
) -> None:
    """Write the rows so far; `complete` is false until every row of the run is in.

    The file is replaced whole (written beside it, then renamed), so a run stopped while it
    writes keeps the rows of the last write."""
    args = runs[0][1]
    payload = {
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "gpu": gpu_name(runs),
        "complete": complete,
        "rows": [asdict(r) for r in rows],
        "stage_profiles": profiles,
        **(extra or {}),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    partial = f"{path}.partial"
    try:
        with open(partial, "w") as f:
            json.dump(payload, f, indent=2)
    except BaseException:  # stopped while writing: the last whole write stays, nothing else
        Path(partial).unlink(missing_ok=True)
        raise
    os.replace(partial, path)


def run_model(
    runs: Sequence[tuple[torch.device, argparse.Namespace]],
    json_path: str | None,
    plot_path: str | None,
    payload_extra: dict | None = None,
) -> list[Row]:
    """Measure one model on each device (with that device's options), print, save, draw."""
    rows: list[Row] = []
    profiles: dict[str, list[dict]] = {}
    reference_cache: dict[str, float] = {}
    described = None
    for device, args in runs:
        if args is not described:
            print(describe(args, device), flush=True)
            described = args
        shares = pattern_shares(args.pattern, args.n_exits)
        for bs in args.batch_sizes:
            rows.append(measure(args, device, bs, shares, reference_cache))
            if json_path:  # each row as it comes: a run stopped early keeps what it measured
                save_json(json_path, runs, rows, profiles, payload_extra, complete=False)
            print_table(rows[-1:], header=len(rows) == 1)
            for line in [*format_methods(rows[-1]), *format_rounds(rows[-1])]:
                print(line)
            sys.stdout.flush()
        if args.profile_stages:
            bs = max(args.batch_sizes)
            dev = str(device)
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
    gpu = gpu_name(runs)
    if json_path:
        save_json(json_path, runs, rows, profiles, payload_extra, complete=True)
        print(f"wrote {json_path}")
    if plot_path and rows:
        series = group_rows([asdict(r) for r in rows], gpu)
        plot_results(series, plot_path)
        plot_speedups(series, speedup_path(plot_path))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    global _clock
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.show:
        show_saved(args.show)
        return 0
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PNG, the image to write")
        series = load_series(args.replot)
        plot_results(series, args.plot)
        print(f"wrote {args.plot}")
        if plot_speedups(series, speedup_path(args.plot)):
            print(f"wrote {speedup_path(args.plot)}")
        return 0
    if args.preset and args.json:
        parser.error("--preset writes one JSON per model: give --json-dir DIR instead of --json")
    _clock = CLOCKS[args.clock]
    if args.malloc == "tuned" and not tune_malloc():
        args.malloc = "system (tuning failed: not glibc)"
    args.threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(args.threads)
    devices = [
        torch.device(d)
        for d in args.devices or ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    ]

    def json_path(model: str) -> str | None:
        return str(Path(args.json_dir) / f"speed-{model}.json") if args.json_dir else None

    if not args.preset:
        args.samples = args.samples or 256
        runs = [(device, args) for device in devices]
        run_model(runs, args.json or json_path(args.model), args.plot)
        return 0
    for entry in PRESETS[args.preset]:
        runs = [(device, preset_args(args, entry, device)) for device in devices]
        plot = model_path(args.plot, entry.model) if args.plot else None
        run_model(runs, json_path(entry.model), plot, {"preset": args.preset})
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
