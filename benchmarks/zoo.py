"""Coverage of the model zoos: which timm and torchvision classifiers `earlyexit` converts.

Every model is built with random weights and `num_classes=10` at a small input size when it
allows one, converted with `earlyexit.convert(model, n_exits=3)`, and checked:

- eval-mode stages in order give the original model's logits;
- `threshold` above 1: every sample exits at N with the original logits;
- `threshold=0`: every sample exits at 0 with `forward_all`'s exit-0 logits;
- `exit_costs` strictly increasing;
- the user's model is unchanged (state_dict and every module's `training` flag);
- in train mode, backward through `forward_all` reaches every exit head parameter.

Each model runs in a worker process with a time limit; a model that fails is recorded with its
error class and the first line of the message. Results go to a JSON file (which `--resume`
reads back, so the run can be chunked or restarted) and a markdown table.

Example:
    python benchmarks/zoo.py --source timm --filter "resnet*" --limit 20
    python benchmarks/zoo.py --source all --timeout-per-model 60 --max-params 30 --resume
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

SMALL_SIZES = (64, 96, 128, 160, 224)
N_EXITS = 3


# --------------------------------------------------------------------------------------------
# Building models


def count_params_meta(source: str, name: str) -> int | None:
    """Parameter count of a model built on the meta device (no memory, no init cost).

    Models whose constructors compute with tensors can't be built there; those are built on
    the CPU with weight initialisation switched off (allocation only).
    """
    import torch

    try:
        with torch.device("meta"):
            model = _create(source, name, None)
    except Exception:
        inits = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
        saved = {n: getattr(torch.nn.init, n) for n in inits}
        try:
            for n in inits:
                setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
            model = _create(source, name, None)
        except Exception:
            return None
        finally:
            for n, fn in saved.items():
                setattr(torch.nn.init, n, fn)
    return sum(p.numel() for p in model.parameters())


def _create(source: str, name: str, img_size: int | None):
    import timm
    import torchvision

    if source == "torchvision":
        return torchvision.models.get_model(name, weights=None, num_classes=10)
    kwargs: dict[str, Any] = {"num_classes": 10}
    if img_size is not None:
        kwargs["img_size"] = img_size
    return timm.create_model(name, pretrained=False, **kwargs)


def _default_size(source: str, name: str, model) -> tuple[int, int, int]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if "input_size" in cfg:
        return tuple(cfg["input_size"])
    if source == "torchvision" and "inception" in name:
        return (3, 299, 299)
    return (3, 224, 224)


def build(source: str, name: str, small: int = 64):
    """Build a model and the smallest input size (among a few) it runs at.

    Returns:
        `(model, input_size)`, the model in eval mode.
    """
    import torch

    tried: list[str] = []
    attempts: list[tuple[int | None, int | None]] = []
    sizes = [s for s in SMALL_SIZES if s >= small]
    for s in sizes:
        if source == "timm":
            attempts.append((s, s))  # a model that takes `img_size`
        attempts.append((None, s))
    attempts.append((None, None))  # its own default size
    cache: dict[int | None, Any] = {}
    last: Exception | None = None
    takes_img_size = True
    for img_size, size in attempts:
        if img_size is not None and not takes_img_size:
            continue
        try:
            if img_size not in cache:
                cache.clear()
                cache[img_size] = _create(source, name, img_size).eval()
            model = cache[img_size]
        except TypeError as err:
            if img_size is not None:
                takes_img_size = False
                continue
            raise err
        except Exception as err:
            last = err
            tried.append(f"img_size={img_size}: {type(err).__name__}")
            continue
        in_chans = _default_size(source, name, model)[0]
        input_size = (in_chans, size, size) if size else _default_size(source, name, model)
        try:
            with torch.no_grad():
                out = model(torch.randn(2, *input_size))
                # Train mode too: auxiliary heads (Inception) need larger inputs than the rest.
                model.train()
                model(torch.randn(2, *input_size))
                model.eval()
            if isinstance(out, torch.Tensor) and out.shape == (2, 10):
                return model, input_size
            tried.append(f"{input_size}: output {type(out).__name__}")
        except Exception as err:
            model.eval()
            last = err
            tried.append(f"{input_size}: {type(err).__name__}")
    raise RuntimeError(f"model does not run at any tried size ({'; '.join(tried)})") from last


# --------------------------------------------------------------------------------------------
# The check


class InvariantError(AssertionError):
    """The model converted but an invariant does not hold."""


def _close(a, b, what: str) -> None:
    import torch

    big = max(a.abs().max().item(), b.abs().max().item(), 1.0)
    try:
        torch.testing.assert_close(a, b, atol=1e-5 * big, rtol=1e-4)
    except AssertionError as err:
        first = str(err).strip().splitlines()[0]
        raise InvariantError(f"{what}: {first}") from None


def _places(place_exits, fractions, targets) -> bool:
    import earlyexit

    try:
        place_exits(fractions, targets)
    except earlyexit.PlacementError:
        return False
    return True


def check(model, input_size: tuple[int, ...], n_exits: int = N_EXITS) -> dict[str, Any]:
    """Convert a model and check the invariants; raise on the first that fails.

    Returns:
        Facts about the converted net (exit names, costs, number of candidates).
    """
    import torch

    import earlyexit

    torch.manual_seed(0)
    model.eval()
    x = torch.randn(3, *input_size)
    with torch.no_grad():
        ref = model(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]

    try:
        net = earlyexit.convert(model, n_exits=n_exits, input_size=input_size)
    except earlyexit.PlacementError:
        # Too few candidates (or none deep enough) for N exits: use as many as fit.
        from earlyexit.placement import distribution_targets, place_exits

        fractions = [c.fraction for c in earlyexit.profile(model, input_size).candidates]
        fits = [
            n
            for n in range(1, n_exits)
            if _places(place_exits, fractions, distribution_targets("pareto", n))
        ]
        n_exits = max(fits, default=1)
        net = earlyexit.convert(model, n_exits=n_exits, input_size=input_size)
    after = model.state_dict()
    if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
        raise InvariantError("convert changed the model's state_dict")
    if flags != [m.training for m in model.modules()]:
        raise InvariantError("convert changed a module's training flag")
    costs = net.exit_costs
    if not bool((costs[1:] > costs[:-1]).all()):
        raise InvariantError(f"exit_costs not strictly increasing: {costs.tolist()}")

    net.eval()
    with torch.no_grad():
        outs = net.forward_all(x)
        _close(outs.logits[-1], ref, "forward_all final logits vs model(x)")
        never = net.early_exit(x, threshold=1.5)
        if not bool((never.exit_index == n_exits).all()):
            raise InvariantError(f"threshold 1.5: exits {never.exit_index.tolist()}")
        _close(never.logits, ref, "threshold 1.5 logits vs model(x)")
        first = net.early_exit(x, threshold=0.0)
        if not bool((first.exit_index == 0).all()):
            raise InvariantError(f"threshold 0: exits {first.exit_index.tolist()}")
        _close(first.logits, outs.logits[0], "threshold 0 logits vs exit-0 logits")
        # A threshold that lets some samples go early and keeps others: the stages then run
        # on smaller batches than they were traced with.
        h = torch.stack([torch.sigmoid(a) for a in outs.confidence_logits])
        mixed = net.early_exit(x, threshold=float(h[0].median()))
        picked = torch.stack(outs.logits)[mixed.exit_index, torch.arange(len(x))]
        _close(mixed.logits, picked, "mixed threshold logits vs forward_all at each exit")
    after = model.state_dict()
    if any(not torch.equal(before[k], after[k]) for k in before):
        raise InvariantError("eval-mode inference changed the model's state_dict")

    net.train()
    train_outs = net.forward_all(x)
    loss = sum(z.float().mean() for z in train_outs.logits)
    loss = loss + sum(a.float().mean() for a in train_outs.confidence_logits)
    loss.backward()
    missing = [n for n, p in net.heads.named_parameters() if p.grad is None]
    if missing:
        raise InvariantError(f"no gradient reaches head parameters {missing}")
    return {
        "n_exits": n_exits,
        "exit_names": net.exit_names,
        "exit_costs": [round(c, 4) for c in net.exit_costs.tolist()],
    }


# --------------------------------------------------------------------------------------------
# Workers


def _first_line(err: BaseException) -> str:
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def run_one(source: str, name: str, small: int, max_params: float) -> dict[str, Any]:
    """Build, convert and check one model; never raises.

    Args:
        source: `timm` or `torchvision`.
        name: the model's name in that zoo.
        small: the smallest input size to try.
        max_params: skip models with more parameters than this many millions.
    """
    import earlyexit

    record: dict[str, Any] = {"source": source, "name": name}
    start = time.perf_counter()
    params = count_params_meta(source, name)
    if params is not None:
        record["params_m"] = round(params / 1e6, 2)
        if params > max_params * 1e6:
            return record | {
                "status": "skipped",
                "error": "TooBig",
                "message": f"skipped: too big for this machine ({params / 1e6:.0f}M params)",
            }
    try:
        model, input_size = build(source, name, small)
    except Exception as err:
        record.update(status="not_built", error=type(err).__name__, message=_first_line(err))
        record["seconds"] = round(time.perf_counter() - start, 2)
        return record
    record["input_size"] = list(input_size)
    try:
        record.update(check(model, input_size))
        record["status"] = "converted"
    except InvariantError as err:
        record.update(status="invariant", error="InvariantError", message=_first_line(err))
    except earlyexit.EarlyExitError as err:
        record.update(status="unsupported", error=type(err).__name__, message=_first_line(err))
    except Exception as err:
        tb = traceback.extract_tb(err.__traceback__)
        where = f"{Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
        record.update(
            status="crash", error=type(err).__name__, message=_first_line(err), where=where
        )
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def _worker(conn, threads: int) -> None:
    import torch

    # Ctrl-C (or `timeout -s INT`) reaches the whole process group: the parent saves and
    # stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    warnings.simplefilter("ignore")
    torch.set_num_threads(threads)
    import earlyexit  # noqa: F401  (registers the paper's models in timm)

    while True:
        task = conn.recv()
        if task is None:
            return
        conn.send(run_one(*task))


class _Pool:
    """Worker processes, each doing one model at a time, killed and replaced on a timeout."""

    def __init__(self, n: int, threads: int) -> None:
        self.ctx = mp.get_context("spawn")
        self.threads = threads
        self.slots = [self._start() for _ in range(n)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.threads), daemon=True)
        proc.start()
        return {"proc": proc, "conn": parent, "task": None, "since": 0.0}

    def run(self, tasks, timeout: float):
        """Yield one result per task, in completion order."""
        tasks = list(tasks)
        while tasks or any(s["task"] for s in self.slots):
            for slot in self.slots:
                if slot["task"] is None and tasks:
                    slot["task"] = tasks.pop(0)
                    slot["since"] = time.monotonic()
                    slot["conn"].send(slot["task"])
            busy = [s for s in self.slots if s["task"]]
            ready = wait([s["conn"] for s in busy] + [s["proc"].sentinel for s in busy], 1.0)
            now = time.monotonic()
            for i, slot in enumerate(self.slots):
                task = slot["task"]
                if task is None:
                    continue
                if slot["conn"] in ready:
                    try:
                        result = slot["conn"].recv()
                    except EOFError:
                        result = None
                    if result is not None:
                        slot["task"] = None
                        yield result
                        continue
                died = not slot["proc"].is_alive()
                if died or now - slot["since"] > timeout:
                    slot["proc"].kill()
                    slot["proc"].join()
                    self.slots[i] = self._start()
                    source, name = task[:2]
                    status = "crash" if died else "timeout"
                    yield {
                        "source": source,
                        "name": name,
                        "status": status,
                        "error": "WorkerDied" if died else "Timeout",
                        "message": (
                            f"worker exited with code {slot['proc'].exitcode}"
                            if died
                            else f"over {timeout:.0f} s"
                        ),
                        "seconds": round(now - slot["since"], 2),
                    }

    def close(self) -> None:
        for slot in self.slots:
            with contextlib.suppress(BrokenPipeError, OSError):
                slot["conn"].send(None)
            slot["proc"].join(timeout=5)
            if slot["proc"].is_alive():
                slot["proc"].kill()


# --------------------------------------------------------------------------------------------
# Listing, reporting, main


def list_zoo(source: str, pattern: str | None) -> list[tuple[str, str]]:
    """`(source, name)` of every classification model of a zoo, optionally glob-filtered."""
    names: list[tuple[str, str]] = []
    if source in ("timm", "all"):
        import timm

        names += [("timm", n) for n in timm.list_models()]
    if source in ("torchvision", "all"):
        import torchvision

        names += [("torchvision", n) for n in torchvision.models.list_models(torchvision.models)]
    if pattern:
        globs = [g.strip() for g in pattern.split(",") if g.strip()]
        names = [(s, n) for s, n in names if any(fnmatch.fnmatch(n, g) for g in globs)]
    return names


STATUS_ORDER = ("converted", "unsupported", "invariant", "crash", "timeout", "not_built", "skipped")


def summarize(records: list[dict[str, Any]]) -> str:
    """A markdown report: coverage per source, top failure reasons, then one row per model."""
    lines = ["# earlyexit zoo coverage", ""]
    lines += ["| source | attempted | converted | " + " | ".join(STATUS_ORDER[1:]) + " |"]
    lines += ["|" + " --- |" * (3 + len(STATUS_ORDER) - 1)]
    for source in sorted({r["source"] for r in records}):
        rs = [r for r in records if r["source"] == source]
        c = Counter(r["status"] for r in rs)
        attempted = len(rs) - c["skipped"] - c["not_built"]
        row = [source, str(attempted)] + [str(c[s]) for s in STATUS_ORDER]
        lines.append("| " + " | ".join(row) + " |")
    failures = Counter(
        (r["status"], r.get("error", ""), r.get("message", "")[:120])
        for r in records
        if r["status"] not in ("converted", "skipped")
    )
    if failures:
        lines += ["", "## Failure reasons", "", "| count | status | error | message |"]
        lines += ["| --- | --- | --- | --- |"]
        for (status, error, message), n in failures.most_common():
            message = message.replace("|", "\\|")
            lines.append(f"| {n} | {status} | {error} | {message} |")
    lines += ["", "## Models", "", "| source | model | status | input | s | detail |"]
    lines += ["| --- | --- | --- | --- | --- | --- |"]
    for r in sorted(records, key=lambda r: (r["source"], r["name"])):
        size = "x".join(str(s) for s in r.get("input_size", [])[1:])
        detail = r.get("error", "") + (": " + r["message"] if r.get("message") else "")
        detail = detail.replace("|", "\\|")[:160]
        lines.append(
            f"| {r['source']} | {r['name']} | {r['status']} | {size} | {r.get('seconds', '')} "
            f"| {detail} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert every timm / torchvision classifier and check the invariants.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--source", choices=("timm", "torchvision", "all"), default="all")
    parser.add_argument(
        "--filter", default=None, help="comma-separated globs on model names, e.g. 'resnet*,vit_*'"
    )
    parser.add_argument(
        "--order",
        choices=("name", "random"),
        default="name",
        help="model order; `random` (seeded) samples every family when runs are cut short",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of `--order random`")
    parser.add_argument("--start", type=int, default=0, help="index of the first model")
    parser.add_argument("--limit", type=int, default=None, help="how many models at most")
    parser.add_argument("--timeout-per-model", type=float, default=120.0, help="seconds")
    parser.add_argument(
        "--max-params", type=float, default=60.0, help="skip models above this many M params"
    )
    parser.add_argument("--size", type=int, default=64, help="smallest input size to try")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads per worker (more oversubscribe)"
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/zoo"))
    parser.add_argument(
        "--resume", action="store_true", help="keep results in --out's JSON, run the rest"
    )
    parser.add_argument(
        "--retry",
        nargs="*",
        default=None,
        metavar="STATUS",
        help="with --resume, run again the models with these statuses (default: all failures)",
    )
    args = parser.parse_args(argv)

    from tqdm import tqdm

    models = list_zoo(args.source, args.filter)
    if args.order == "random":
        random.Random(args.seed).shuffle(models)
    end = None if args.limit is None else args.start + args.limit
    models = models[args.start : end]
    json_path = args.out.with_suffix(".json")
    md_path = args.out.with_suffix(".md")
    done: dict[tuple[str, str], dict[str, Any]] = {}
    if args.resume and json_path.exists():
        for r in json.loads(json_path.read_text()):
            done[(r["source"], r["name"])] = r
        if args.retry is not None:
            # Only the selected models run again; the other records stay as they are.
            retry = set(args.retry) or set(STATUS_ORDER) - {"converted", "skipped"}
            selected = set(models)
            done = {k: r for k, r in done.items() if k not in selected or r["status"] not in retry}
    todo = [m for m in models if m not in done]

    def save() -> None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        records = sorted(done.values(), key=lambda r: (r["source"], r["name"]))
        json_path.write_text(json.dumps(records, indent=1))
        md_path.write_text(summarize(records))

    bar = tqdm(total=len(todo), unit="model", dynamic_ncols=True)
    runnable = [(source, name, args.size, args.max_params) for source, name in todo]
    pool = _Pool(args.workers, args.threads)
    try:
        for i, record in enumerate(pool.run(runnable, args.timeout_per_model)):
            done[(record["source"], record["name"])] = record
            bar.set_postfix_str(f"{record['name']}: {record['status']}")
            bar.update()
            if i % 5 == 0:
                save()
    except KeyboardInterrupt:
        pass
    finally:
        pool.close()
        bar.close()
        save()
    print(summarize(list(done.values())).split("\n## Models")[0])
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
