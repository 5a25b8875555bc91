"""Which training recipe keeps the accuracy? An ablation over losses, heads and inits.

Each variant is a converted net trained jointly from scratch, in a plain loop (Adam, one
learning rate, the given epochs), beside the plain model trained the same way with the same
seed. For each (setting, variant, seed) it prints and records:

- every exit's own accuracy (exit N is the final exit) and the plain model's;
- the accuracy and mean cost of early-exit inference at the default threshold T = 0.5;
- the best accuracy at mean cost ≤ 0.5 / 0.6 / 0.7 over a fine threshold sweep, with the
  net's learned confidence h_i and, for comparison, with max-softmax confidence;
- thresholds calibrated for mean cost ≤ 0.6 on held-out data, one T (the most accurate
  observed confidence within the budget; `calibrate` picks the same T up to ties and its
  midpoint margin) against one per exit (`fit_exit_thresholds`, as
  `calibrate(per_exit=True)`): two-fold on the test set (calibrated on one half, scored on the
  other, and the other way round; the mean of both), learned confidence.

A variant is a comma-separated list of `key=value` (unknown keys are an error):

    loss=exits|v2+ce|v2|...   EENetLoss version          w=FLOAT   exit_ce_weight
    head=conv|pool|bnpool     exit type                  kd=FLOAT  distill (α)
    q=FLOAT|relative          exit_precision; relative:  gs=FLOAT  grad_scale of the net
                              q = clamp(1 − k ε, 0.5, 0.95) per batch, ε the final exit's
                              error rate on the batch (an early exit may be about as
                              error-prone as the final exit); k = qk=FLOAT, default 1.3
    zi=0|1                    zero_init_last of the CIFAR ResNets (default 0, the models' default)
    cw=32|c                   conv heads' width: 32 = the library's (`conv_width`, at least 32),
                              c = the earlier min(C, max(32, C/4)), never wider than the feature
    conf=right|harmless       what `"exits"`' confidence predicts: right = the library's, "this
                              exit is right"; harmless = "leaving here costs nothing": this
                              exit is right or the final exit is wrong
    ci=prior|random           the `conv` heads' confidence at the start: prior = the library's,
                              max-softmax read at q; random = PyTorch's default init of a
                              linear layer (the recorded ci=random rows were measured when
                              the confidence also had two certainty inputs, not three)
    pg=INT                    `conv` heads pool to a grid of at most INT×INT (the library:
                              `POOL_GRID`, 4)
    hg=INT                    `conv` heads keep a layout of at most INT×INT cells after their
                              convolution, flattened into both branches (the library:
                              `LAYOUT_GRID`, 2); 1 = a global mean, the library's earlier head
    cd=0|1                    1: the confidence branch reads the head's features detached, so
                              training the confidence never changes the backbone or the head

Settings (MNIST from `--data-dir`, torchvision's layout; digits from scikit-learn):

    mnist-r20     resnet20, 4 pareto exits, 6000 training images, 2 epochs
    mnist-r20n    resnet20 with widths (8, 16, 32): a narrower network, 20000 images, 2 epochs
    mnist-r8      the paper's EENet-8 (resnet8 width 16), 2 quadratic exits, 6000 images
    mnist-r20s    resnet20, 4 pareto exits, 1500 training images, 3 epochs: fewer samples
    mnist-r20f    resnet20, 4 pareto exits, all 60000 training images, 2 epochs
    mnist-r8f     EENet-8 as mnist-r8, all 60000 training images, 2 epochs
    mnist-r20h    mnist-r20f on harder data: each image overlaid with another digit at a
                  random intensity in [0, 1] (easy to ambiguous samples)
    mnist-r8h     mnist-r8f on the same harder data
    digits-r8     resnet8 width 4, 2 quadratic exits, digits, 16 epochs at a constant rate
    digits-r8c    the demo: the same with the rate annealed to 0 over the epochs (cosine)

    python benchmarks/recipe.py --settings mnist-r20n --seeds 0 1 --json recipe.json
    python benchmarks/recipe.py --variants "loss=v2+ce,head=pool" "loss=exits,head=conv"
    python benchmarks/recipe.py --replot recipe.json --plot recipe.png
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

import earlyexit
from earlyexit.calibrate import fit_exit_thresholds, score_exit_thresholds
from earlyexit.demo import load_digits_data, load_mnist_data
from earlyexit.training import ExitCache as _Cache
from earlyexit.training import sweep_thresholds as _sweep
from earlyexit.training import train_one_epoch

#: What each setting trains: model, its kwargs, exits, data, sizes and schedule.
SETTINGS: dict[str, dict] = {
    "mnist-r20": dict(
        model="resnet20",
        kwargs={},
        n_exits=4,
        dist="pareto",
        data="mnist",
        train=6000,
        epochs=2,
        batch=64,
        lr=1e-3,
    ),
    "mnist-r20n": dict(
        model="resnet20",
        kwargs={"widths": (8, 16, 32)},
        n_exits=4,
        dist="pareto",
        data="mnist",
        train=20000,
        epochs=2,
        batch=64,
        lr=1e-3,
    ),
    "mnist-r8": dict(
        model="resnet8",
        kwargs={"width": 16},
        n_exits=2,
        dist="quadratic",
        data="mnist",
        train=6000,
        epochs=2,
        batch=64,
        lr=1e-3,
    ),
    "mnist-r20s": dict(
        model="resnet20",
        kwargs={},
        n_exits=4,
        dist="pareto",
        data="mnist",
        train=1500,
        epochs=3,
        batch=64,
        lr=1e-3,
    ),
    "digits-r8": dict(
        model="resnet8",
        kwargs={"width": 4},
        n_exits=2,
        dist="quadratic",
        data="digits",
        train=None,
        epochs=16,
        batch=32,
        lr=1e-2,
    ),
}
SETTINGS["digits-r8c"] = dict(SETTINGS["digits-r8"], schedule="cosine")
# The protocol the defaults are judged by elsewhere (all 60,000 training images, 2 epochs of
# batch 64, Adam 1e-3), on MNIST:
SETTINGS["mnist-r20f"] = dict(SETTINGS["mnist-r20"], train=None)
SETTINGS["mnist-r8f"] = dict(SETTINGS["mnist-r8"], train=None)
# The same protocol on harder data, with samples from easy to ambiguous (as in natural image
# sets, unlike clean MNIST): each image overlaid with another digit at a random intensity.
SETTINGS["mnist-r20h"] = dict(SETTINGS["mnist-r20f"], overlay=True)
SETTINGS["mnist-r8h"] = dict(SETTINGS["mnist-r8f"], overlay=True)

DEFAULT_VARIANTS = (
    "loss=exits,head=conv",  # the library's defaults (2×2 layout, grad_scale 0.1)
    "loss=exits,head=conv,gs=0",
    "loss=exits,head=conv,gs=1",
    "loss=v2+ce,head=pool",  # the library's earlier defaults
    "loss=exits,head=conv,kd=0.5",
    "loss=exits,head=conv,gs=0.1,kd=0.5",
    "loss=exits,head=conv,zi=1",
)

BUDGETS = (0.5, 0.6, 0.7)
THRESHOLDS = np.concatenate([np.linspace(0.0, 1.0, 401), [1.01]]).astype(np.float32)
KEYS = {"loss", "head", "w", "kd", "q", "qk", "gs", "zi", "cw", "conf", "ci", "cd", "pg", "hg"}
TEST_SAMPLES = 5000
_PLAIN: dict[tuple[str, int, bool], float] = {}  # plain accuracy per (setting, seed, init)


@dataclass
class Record:
    """One trained variant on one seed."""

    setting: str
    variant: str
    seed: int
    plain_accuracy: float
    exit_accuracy: list[float]
    exit_costs: list[float]
    default: dict  # accuracy, cost and exit counts at T = 0.5
    best: dict  # {"learned"|"max_softmax": {budget: accuracy}}
    curves: dict = field(default_factory=dict)  # {"learned"|"max_softmax": [(cost, acc)]}
    seconds: float = 0.0
    # {"single"|"per_exit": {"accuracy", "cost"}}, two-fold calibrated for cost ≤ CALIBRATE_COST
    calibrated: dict = field(default_factory=dict)


def parse_variant(text: str) -> dict[str, str]:
    """`"loss=exits,head=conv"` → a dict, with the defaults filled in."""
    spec = {"loss": "exits", "head": "conv", "zi": "0", "hg": str(earlyexit.heads.LAYOUT_GRID)}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in KEYS or not value:
            raise SystemExit(f"error: bad variant item {part!r}; keys are {sorted(KEYS)}")
        choices = CHOICES.get(key)
        if choices is not None and value not in choices:
            raise SystemExit(f"error: bad variant item {part!r}; {key} is {' or '.join(choices)}")
        spec[key] = value
    return spec


def _data(setting: dict, data_dir: str, seed: int) -> tuple[TensorDataset, TensorDataset]:
    if setting["data"] == "digits":
        return load_digits_data(seed)
    train, test = load_mnist_data(data_dir)
    if setting.get("overlay"):
        train, test = overlay_digits(train, seed=0), overlay_digits(test, seed=1)
    generator = torch.Generator().manual_seed(1000 + seed)
    if setting["train"] is not None:
        train = Subset(train, torch.randperm(len(train), generator=generator)[: setting["train"]])
    return train, Subset(test, range(TEST_SAMPLES))


def overlay_digits(data: TensorDataset, seed: int) -> TensorDataset:
    """Each image overlaid (pixel-wise max) with another image of the set at an intensity
    drawn uniformly from [0, 1]; the label stays the first image's.

    Faint distractors leave a sample easy; near full intensity the two digits are alike and
    the label is a guess, so difficulty ranges from none to ambiguous. The draw is fixed by
    `seed` (the data set is the same for every training seed).
    """
    from earlyexit.models.mnist_resnet import MNIST_MEAN, MNIST_STD

    x, y = data.tensors
    generator = torch.Generator().manual_seed(seed)
    other = torch.randperm(len(x), generator=generator)
    alpha = torch.rand(len(x), 1, 1, 1, generator=generator)
    raw = x * MNIST_STD[0] + MNIST_MEAN[0]
    mixed = torch.maximum(raw, alpha * raw[other])
    return TensorDataset((mixed - MNIST_MEAN[0]) / MNIST_STD[0], y)


def _harmless_labels(log_probs, final_log_probs, labels):
    """1 where leaving at the exit costs no accuracy: it is right, or the final exit is wrong."""
    right = log_probs.detach().argmax(dim=1) == labels
    return right | (final_log_probs.detach().argmax(dim=1) != labels)


CONFIDENCE_LABELS = {
    "right": earlyexit.loss._confidence_labels,
    "harmless": _harmless_labels,
}
#: The variant keys whose values are one of a few words.
CHOICES = {"conf": tuple(CONFIDENCE_LABELS), "ci": ("prior", "random"), "cd": ("0", "1")}


_fixed_precision_logit = earlyexit.loss._precision_logit


def _relative_precision_logit(q, final_log_probs, labels, k: float = 1.3):
    """logit of q = clamp(1 − k ε, 0.5, 0.95), ε the final exit's error rate on the batch."""
    with torch.no_grad():
        error = (final_log_probs.argmax(dim=1) != labels).to(final_log_probs.dtype).mean()
        q_batch = (1.0 - k * error).clamp(0.5, 0.95)
        return torch.log(q_batch / (1.0 - q_batch))


def _narrow_width(channels: int) -> int:
    """The `conv` heads' width before it had a floor of 32 whatever the feature's width."""
    return min(channels, max(earlyexit.heads.CONV_MIN_WIDTH, channels // 4))


def _model(setting: dict, zero_init: bool) -> nn.Module:
    kwargs = dict(setting["kwargs"], num_classes=10, in_chans=1)
    if setting["model"] != "resnet8":
        kwargs["zero_init_last"] = zero_init
    return timm.create_model(setting["model"], **kwargs)


def _fit(net: nn.Module, criterion, data, setting: dict, seed: int, progress: bool) -> None:
    optimizer = torch.optim.Adam(net.parameters(), lr=setting["lr"])
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=setting["batch"], shuffle=True, generator=generator)
    epochs = setting["epochs"]
    cosine = setting.get("schedule") == "cosine"
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs) if cosine else None
    for epoch in range(epochs):
        train_one_epoch(net, loader, criterion, optimizer, "cpu", epoch, progress=progress)
        if schedule is not None:
            schedule.step()


@torch.no_grad()
def _caches(net: earlyexit.EarlyExitNet, test) -> tuple[dict[str, _Cache], np.ndarray]:
    """The learned and max-softmax confidence caches, and each exit's correctness."""
    net.eval()
    learned, softmax, correct = [], [], []
    for x, y in DataLoader(test, batch_size=500):
        out = net.forward_all(x)
        learned.append(torch.stack([torch.sigmoid(a) for a in out.confidence_logits], 1))
        softmax.append(torch.stack([z.softmax(1).amax(1) for z in out.logits[:-1]], 1))
        correct.append(torch.stack([z.argmax(1) == y for z in out.logits], 1))
    right = torch.cat(correct).numpy()
    costs = net.exit_costs.double().numpy()
    return {
        "learned": _Cache(torch.cat(learned).numpy(), right, costs),
        "max_softmax": _Cache(torch.cat(softmax).numpy(), right, costs),
    }, right


CALIBRATE_COST = 0.6


def _subset(cache: _Cache, rows: np.ndarray) -> _Cache:
    return _Cache(cache.confidence[rows], cache.correct[rows], cache.costs)


def cross_calibrate(cache: _Cache, seed: int) -> dict[str, dict[str, float]]:
    """One T against one per exit, for mean cost ≤ CALIBRATE_COST, two-fold.

    The samples are split in two halves at random; thresholds are fitted on one half and
    scored on the other, both ways, and the two scores averaged.
    """
    order = np.random.default_rng(seed).permutation(cache.num_samples)
    halves = np.array_split(order, 2)
    scores: dict[str, list[tuple[float, float]]] = {"single": [], "per_exit": []}
    for fit_rows, test_rows in (halves, halves[::-1]):
        fit, held_out = _subset(cache, fit_rows), _subset(cache, test_rows)
        values = np.unique(np.concatenate([fit.confidence.ravel(), [0.0, 2.0]]))
        accuracy, cost, _ = _sweep(fit, values)
        ok = cost <= CALIBRATE_COST + 1e-9
        t = float(values[np.flatnonzero(ok)[np.argmax(accuracy[ok])]]) if ok.any() else 2.0
        single = _sweep(held_out, [t])
        scores["single"].append((float(single[0][0]), float(single[1][0])))
        try:
            per_exit = fit_exit_thresholds(fit, target_cost=CALIBRATE_COST)
        except ValueError:
            per_exit = [2.0] * (fit.confidence.shape[1])
        a, c, _ = score_exit_thresholds(held_out, per_exit)
        scores["per_exit"].append((a, c))
    return {
        k: {
            "accuracy": float(np.mean([a for a, _ in v])),
            "cost": float(np.mean([c for _, c in v])),
        }
        for k, v in scores.items()
    }


def _detach_input(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.detach() for a in args)


def _plain_accuracy(model: nn.Module, test) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in DataLoader(test, 500))
    return hits / len(test)


def run_one(name: str, variant: str, seed: int, data_dir: str, progress: bool) -> Record:
    """Train the plain model and one variant on one seed; measure both."""
    setting, spec = SETTINGS[name], parse_variant(variant)
    train, test = _data(setting, data_dir, seed)
    zero_init = spec["zi"] == "1"
    start = time.perf_counter()
    key = (name, seed, zero_init)
    if key not in _PLAIN:  # the same for every variant with this init
        torch.manual_seed(seed)
        plain = _model(setting, zero_init)
        _fit(plain, nn.CrossEntropyLoss(), train, setting, seed, progress)
        _PLAIN[key] = _plain_accuracy(plain, test)
    plain_accuracy = _PLAIN[key]

    torch.manual_seed(seed)
    model = _model(setting, zero_init)
    width = _narrow_width if spec.get("cw") == "c" else earlyexit.heads.conv_width
    window = earlyexit.heads.pool_window
    if "pg" in spec:
        window = functools.partial(earlyexit.heads.pool_window, grid=int(spec["pg"]))
    head = functools.partial(earlyexit.heads.ExitHead, layout=int(spec["hg"]))
    with (
        mock.patch.object(earlyexit.heads, "conv_width", width),
        mock.patch.object(earlyexit.heads, "pool_window", window),
        mock.patch.object(earlyexit.model, "ExitHead", head),
    ):
        net = earlyexit.convert(
            model,
            n_exits=setting["n_exits"],
            dist=setting["dist"],
            exit_type=spec["head"],
            input_size=(1, 28, 28),
        )
    if "gs" in spec:
        net.config.grad_scale = float(spec["gs"])
    if spec.get("ci", "prior") == "random":
        for head in net.heads:
            head.confidence.reset_parameters()
    if spec.get("cd") == "1":
        for head in net.heads:
            head.confidence.register_forward_pre_hook(_detach_input)
    options = {"exit_ce_weight": float(spec["w"])} if "w" in spec else {}
    if "kd" in spec:
        options["distill"] = float(spec["kd"])
    if spec.get("q", "relative") != "relative":
        options["exit_precision"] = float(spec["q"])
    criterion = earlyexit.EENetLoss(lam=1.0, version=spec["loss"], **options)
    labels = CONFIDENCE_LABELS[spec.get("conf", "right")]
    shift = _fixed_precision_logit
    if spec.get("q") == "relative":
        shift = functools.partial(_relative_precision_logit, k=float(spec.get("qk", 1.3)))
    with (
        mock.patch.object(earlyexit.loss, "_confidence_labels", labels),
        mock.patch.object(earlyexit.loss, "_precision_logit", shift),
    ):
        _fit(net, criterion, train, setting, seed, progress)
    caches, right = _caches(net, test)
    best, curves = {}, {}
    for kind, cache in caches.items():
        accuracy, cost, counts = _sweep(cache, THRESHOLDS)
        best[kind] = {
            str(b): float(accuracy[cost <= b].max()) if (cost <= b).any() else None for b in BUDGETS
        }
        curves[kind] = [(float(c), float(a)) for c, a in zip(cost, accuracy)]
        if kind == "learned":
            at = int(np.argmin(np.abs(THRESHOLDS - net.threshold)))
            default = {
                "accuracy": float(accuracy[at]),
                "cost": float(cost[at]),
                "exit_counts": counts[at].tolist(),
            }
    return Record(
        setting=name,
        variant=variant,
        seed=seed,
        plain_accuracy=plain_accuracy,
        exit_accuracy=right.mean(axis=0).tolist(),
        exit_costs=net.exit_costs.tolist(),
        default=default,
        best=best,
        curves=curves,
        seconds=time.perf_counter() - start,
        calibrated=cross_calibrate(caches["learned"], seed),
    )


def _pp(value: float | None, ref: float) -> str:
    return "   -  " if value is None else f"{100 * (value - ref):+6.2f}"


def _mean_delta(rs: list[Record], get) -> float | None:
    """The mean over seeds of `get(record)` minus that seed's plain accuracy."""
    values = [get(r) for r in rs]
    if any(v is None for v in values):
        return None
    return float(np.mean([v - r.plain_accuracy for v, r in zip(values, rs)]))


def format_table(records: list[Record]) -> str:
    """Means over seeds, in points against the plain model of the same seed."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.setting, r.variant), []).append(r)
    lines = [
        "Points against the plain model (mean over seeds); T=0.5 with the learned confidence.",
        f"{'setting':<11} {'variant':<34} {'seeds':>5} {'plain%':>7} {'exits own acc %':<30}"
        f" {'final':>6} {'T=.5':>6} {'cost':>5}"
        + "".join(f" {'≤' + str(b):>6}" for b in BUDGETS)
        + "".join(f" {'ms≤' + str(b):>6}" for b in BUDGETS)
        + f" {'cal 1T':>12} {'cal per-exit':>12}",
    ]
    for (setting, variant), rs in groups.items():
        plain = float(np.mean([r.plain_accuracy for r in rs]))

        own = np.mean([r.exit_accuracy for r in rs], axis=0)
        row = (
            f"{setting:<11} {variant:<34} {len(rs):>5} {100 * plain:>7.2f} "
            f"{' '.join(f'{100 * a:.1f}' for a in own):<30}"
            f" {_pp(_mean_delta(rs, lambda r: r.exit_accuracy[-1]), 0)}"
            f" {_pp(_mean_delta(rs, lambda r: r.default['accuracy']), 0)}"
            f" {np.mean([r.default['cost'] for r in rs]):>5.2f}"
        )
        for kind in ("learned", "max_softmax"):
            for b in BUDGETS:
                row += f" {_pp(_mean_delta(rs, lambda r, k=kind, b=b: r.best[k][str(b)]), 0)}"
        for kind in ("single", "per_exit"):
            if all(r.calibrated for r in rs):
                delta = _mean_delta(rs, lambda r, k=kind: r.calibrated[k]["accuracy"])
                cost = np.mean([r.calibrated[kind]["cost"] for r in rs])
                row += f" {_pp(delta, 0)} @{cost:.2f}"
            else:
                row += f" {'-':>12}"
        lines.append(row)
    return "\n".join(lines)


def format_markdown(records: list[Record]) -> str:
    """The table of `format_table` as Markdown, for the docs."""
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in records:
        groups.setdefault((r.setting, r.variant), []).append(r)
    head = (
        "| setting | variant | seeds | plain % | exits' own accuracy % | final | T = 0.5 "
        "| its cost | best ≤ 0.5 | best ≤ 0.6 | best ≤ 0.7 | max-softmax ≤ 0.6 | calibrated, one T "
        "| calibrated, per exit |"
    )
    lines = [head, "| --- | --- | ---: | ---: | --- |" + " ---: |" * 9]
    for (setting, variant), rs in groups.items():
        plain = float(np.mean([r.plain_accuracy for r in rs]))
        own = np.mean([r.exit_accuracy for r in rs], axis=0)
        cells = [
            setting,
            f"`{variant}`",
            str(len(rs)),
            f"{100 * plain:.2f}",
            " / ".join(f"{100 * a:.1f}" for a in own),
            _pp(_mean_delta(rs, lambda r: r.exit_accuracy[-1]), 0).strip(),
            _pp(_mean_delta(rs, lambda r: r.default["accuracy"]), 0).strip(),
            f"{np.mean([r.default['cost'] for r in rs]):.2f}",
        ]
        for b in BUDGETS:
            cells.append(_pp(_mean_delta(rs, lambda r, b=b: r.best["learned"][str(b)]), 0).strip())
        cells.append(_pp(_mean_delta(rs, lambda r: r.best["max_softmax"]["0.6"]), 0).strip())
        for kind in ("single", "per_exit"):
            if all(r.calibrated for r in rs):
                delta = _mean_delta(rs, lambda r, k=kind: r.calibrated[k]["accuracy"])
                cost = np.mean([r.calibrated[kind]["cost"] for r in rs])
                cells.append(f"{_pp(delta, 0).strip()} at {cost:.2f}")
            else:
                cells.append("-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


PLOT_COLUMNS = 4  # panels per row of the trade-off plot


def plot(records: list[Record], path: str) -> None:
    """Accuracy against mean cost (learned confidence), one panel per setting and one seed.

    The seed is the one with the most variants (the first such).

    Variants that change the backbone's init are left out: their plain model is another one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({r.setting for r in records})
    cols = min(len(settings), PLOT_COLUMNS)
    rows = -(-len(settings) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.flat[len(settings) :]:
        ax.set_visible(False)
    for ax, setting in zip(axes.flat, settings):
        seeds = [r.seed for r in records if r.setting == setting]
        seed = min(seeds, key=lambda k: (-seeds.count(k), k))  # the one with the most variants
        rs = [r for r in records if r.setting == setting and r.seed == seed]
        rs = [r for r in rs if parse_variant(r.variant)["zi"] == "0"]
        top = 0.0
        for r in rs:
            cost, acc = zip(*sorted(r.curves["learned"]))
            ax.plot(cost, 100 * np.asarray(acc), label=r.variant, lw=1.2)
            top = max(top, 100 * max(acc))
        plain = 100 * rs[0].plain_accuracy
        ax.axhline(plain, color="k", ls="--", lw=0.8, label="plain model")
        ax.set_ylim(plain - 6, max(top, plain) + 0.5)
        ax.set_xlabel("mean relative cost")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{setting} (seed {seed}, learned confidence)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", default=["mnist-r20n"], choices=list(SETTINGS))
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--data-dir", default="data", help="folder that holds MNIST/raw")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--json", help="write (and resume from) the records here")
    parser.add_argument("--plot", help="draw the trade-off curves to this PNG")
    parser.add_argument("--replot", nargs="+", help="only print and plot saved JSON files")
    parser.add_argument("--progress", action="store_true", help="show training progress")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    for variant in args.variants:
        parse_variant(variant)
    if args.threads:
        torch.set_num_threads(args.threads)
    records: list[Record] = []
    if args.replot:
        for file in args.replot:
            records += [Record(**r) for r in json.loads(Path(file).read_text())]
    else:
        if args.json and Path(args.json).exists():
            records = [Record(**r) for r in json.loads(Path(args.json).read_text())]
        done = {(r.setting, r.variant, r.seed) for r in records}
        for setting in args.settings:
            for seed in args.seeds:
                for variant in args.variants:
                    if (setting, variant, seed) in done:
                        continue
                    r = run_one(setting, variant, seed, args.data_dir, args.progress)
                    records.append(r)
                    print(
                        f"{setting} {variant} seed {seed}: plain {100 * r.plain_accuracy:.2f} "
                        f"exits {' '.join(f'{100 * a:.1f}' for a in r.exit_accuracy)} "
                        f"T=0.5 {100 * r.default['accuracy']:.2f}@{r.default['cost']:.2f} "
                        f"({r.seconds:.0f} s)",
                        flush=True,
                    )
                    if args.json:
                        Path(args.json).write_text(
                            json.dumps([asdict(x) for x in records], indent=1)
                        )
    if not records:
        print("error: nothing to report", file=sys.stderr)
        return 2
    print(format_markdown(records) if args.markdown else format_table(records))
    if args.plot:
        plot(records, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
