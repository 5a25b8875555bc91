"""Where the time of early exit with nobody leaving goes, piece by piece, on one device.

`speed.py` reports the *no-exit overhead*: `net.early_exit` with nobody leaving (T above 1)
against the original model run the best way (on CPU the original traced with the net's own
inference rewrites, `speed.fold_original`). This script splits that ratio into its parts by
timing, interleaved in one process (`--rounds` rounds, each method once per round, in turn,
each round starting one method later than the round before; the median per method):

- `original`: the rewritten original, the baseline;
- `stages_alone`: the net's stages in order, each leaving its input alone
  (`net.staged.inference_stages()`): what splitting the model costs by itself;
- `stages`: the stages that early exit runs, each from stage 1 on taking over its input
  (`inference_stages(chained=True)`);
- `stages_heads`: those stages with each exit head after its stage, as early exit runs the
  heads (folded, `net._inference_heads()`);
- `no_exit`: `net.early_exit(x, threshold=2.0)`: the heads' test, the host synchronisation and
  the bookkeeping on top;
- `stages_heads_as_written`: `stages_heads` with the heads as written instead of folded
  (`earlyexit._head_folding`): an A/B of the folding within the pass, in the same rounds.

and, apart from the pass, `heads_alone` (and `heads_alone_as_written`): each head run on its
stage's output right after itself (warm caches), summed. The steps from one line to the next
(the last against `stages`) are the parts of the overhead: the cut between stages, the
handing over of inputs, the heads within the pass (against their cost alone), and the rest.
CPU or CUDA (eager, synchronised), float32, the net's defaults; `--json` keeps the per-round
times.

    python benchmarks/overhead.py --model resnet110 --n-exits 10 --batch-size 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import speed
from fresh import NEVER  # a threshold above 1: nobody leaves early

METHODS = (
    "original",
    "stages_alone",
    "stages",
    "stages_heads",
    "no_exit",
    "stages_heads_as_written",
)
#: Printed against this line instead of the one above it.
STEP_FROM = {"stages_heads_as_written": "stages"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet110")
    p.add_argument("--n-exits", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=10, help="timed calls per method")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-channels-last", action="store_true", help="keep NCHW")
    p.add_argument("--json", help="write the per-round times here")
    return p


def pieces(net, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """The methods, each a call on `x` (see the module docstring)."""
    folded, _ = speed.fold_original(net.backbone)
    alone = net.staged.inference_stages()
    chained = net.staged.inference_stages(chained=True)

    def chain(stages, heads=()) -> Callable[[], object]:
        def run() -> object:
            h = x
            for i, stage in enumerate(stages):
                h = stage(h)
                if i < len(heads):
                    heads[i](h)
            return h

        return run

    return {
        "original": lambda: folded(x),
        "stages_alone": chain(alone),
        "stages": chain(chained),
        "stages_heads": chain(chained, net._inference_heads()),
        "no_exit": lambda: net.early_exit(x, threshold=NEVER),
        "stages_heads_as_written": chain(chained, list(net.heads)),
    }


def heads_alone(
    net, x: torch.Tensor, device: torch.device, rounds: int, heads: list | None = None
) -> float:
    """Seconds per call of all the heads (early exit's, or `heads`), each run on its stage's
    output right after itself."""
    stages = net.staged.inference_stages()
    heads = net._inference_heads() if heads is None else heads
    total, h = 0.0, x
    for stage, head in zip(stages, heads):
        h = stage(h)
        head(h)  # warm
        total += statistics.median(
            _timed(lambda head=head, h=h: head(h), device) for _ in range(rounds)
        )
    return total


def _timed(call: Callable[[], object], device: torch.device) -> float:
    speed.synchronize(device)
    start = time.perf_counter()
    call()
    speed.synchronize(device)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    argv = ["--model", args.model, "--n-exits", str(args.n_exits)]
    argv += [] if args.no_channels_last else ["--channels-last"]
    net = speed.create_net(speed.build_parser().parse_args(argv), device)
    layout = torch.contiguous_format if args.no_channels_last else torch.channels_last
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, *net.input_size, generator=generator)
    x = x.to(device).contiguous(memory_format=layout)
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    with torch.inference_mode():
        calls = pieces(net, x)
        for call in calls.values():
            call()  # warm-up
        for r in range(args.rounds):
            # Each round starts one method later: what runs before a method (and so the
            # state it leaves the allocator in) changes from round to round.
            for method in METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]:
                times[method].append(_timed(calls[method], device))
        alone = heads_alone(net, x, device, args.rounds)
        as_written = heads_alone(net, x, device, args.rounds, list(net.heads))
    n = args.batch_size
    ms = {m: 1e3 * statistics.median(t) / n for m, t in times.items()}
    ms["heads_alone"] = 1e3 * alone / n
    ms["heads_alone_as_written"] = 1e3 * as_written / n
    return {"args": vars(args), "ms_per_sample": ms, "seconds_per_round": times}


def print_table(ms: dict[str, float]) -> None:
    """Each method against the original, and the step from the line before, in its units."""
    base = ms["original"]
    print(f"{'method':24} {'ms/sample':>9} {'÷ original':>10} {'step':>8}")
    for k, m in enumerate(METHODS):
        before = STEP_FROM.get(m, METHODS[k - 1])
        step = f"{(ms[m] - ms[before]) / base:+8.1%}" if k else ""
        print(f"{m:24} {ms[m]:9.3f} {ms[m] / base:10.3f} {step:>8}")
    for m in ("heads_alone", "heads_alone_as_written"):
        print(f"{m:24} {ms[m]:9.3f} {ms[m] / base:10.3f}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args)
    print_table(result["ms_per_sample"])
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
