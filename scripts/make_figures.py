"""Generate the documentation figures from real profiles, conversions and one small training run.

Every number drawn comes from the library itself: `earlyexit.profile` for where the MACs go,
`earlyexit.distribution_targets` and the placement rule for where the exits land,
`earlyexit.convert` for the stages, exit heads and costs of a real EENet, and
`earlyexit.tradeoff_curve` for the accuracy-cost curve of EENet-8 trained on scikit-learn's
bundled digits. Nothing is drawn by hand. The PNGs go to `docs/assets/`, with
`docs/assets/figures.json` holding the numbers behind them (the docs quote it).

    python scripts/make_figures.py                     # everything: ~5 minutes on two CPU cores
    python scripts/make_figures.py --only eenet paper  # some of it

Needs matplotlib and scikit-learn (`pip install earlyexit[docs,demo]`); no download, no GPU.
The figures: `eenet` (a converted resnet20, to scale), `profiles` (cumulative MACs over depth
of four models), `distributions` (where each rule puts 10 exits on resnet110), `costs` (the
quickstart's EENet-110), `paper` (the exit layouts of the paper's Tables 7 and 9, against
ours), `tradeoff` (EENet-8 on digits, 12 epochs), `speed` (efficiency and overhead against
batch size, drawn from the saved results of `benchmarks/speed.py`), `recipe` (the training-recipe
ablation, from `benchmarks/results/recipe.json`) and `mnist` (EENet-8 on MNIST at 20 epochs,
from the saved run of `examples/mnist_eenet8.py`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import timm
import torch
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

import earlyexit
from earlyexit.placement import place_exits

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "docs" / "assets"

#: The figures `--only` can pick, in the order they are made.
FIGURES = (
    "eenet",
    "profiles",
    "distributions",
    "costs",
    "paper",
    "tradeoff",
    "speed",
    "recipe",
    "mnist",
)

#: Models of the cost-profile figure: (timm name, label, input size or None for the model's own).
PROFILE_MODELS = (
    ("resnet110", "ResNet-110 (CIFAR, 32×32)", None),
    ("resnet50", "ResNet-50 (ImageNet, 224×224)", None),
    ("convnext_atto", "ConvNeXt-atto (224×224)", None),
    ("vit_tiny_patch16_224", "ViT-Tiny/16 (224×224)", None),
)

COLORS = {
    "pareto": "#1f77b4",
    "golden_ratio": "#ff7f0e",
    "fine": "#2ca02c",
    "linear": "#d62728",
    "quadratic": "#9467bd",
}


def _short(name: str) -> str:
    return name.replace("layer", "L")


def eenet_diagram(out: Path, numbers: dict) -> None:
    """A converted resnet20 (3 pareto exits) drawn to scale: box widths are stage MACs."""
    model = timm.create_model("resnet20")
    prof = earlyexit.profile(model)
    net = earlyexit.convert(model, n_exits=3, dist="pareto")
    total = net.backbone_macs
    costs = net.exit_costs.tolist()
    bounds = [0.0]
    for macs in net.stage_macs:
        bounds.append(bounds[-1] + macs / total)

    fig, ax = plt.subplots(figsize=(10, 4.0))
    ax.set_xlim(-0.09, 1.12)
    ax.set_ylim(-0.75, 1.95)
    ax.axis("off")
    y0, h = 0.0, 0.42
    shades = ["#dbe9f6", "#c6dbef", "#9ecae1", "#6baed6"]
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        ax.add_patch(
            FancyBboxPatch(
                (a + 0.004, y0),
                b - a - 0.008,
                h,
                boxstyle="round,pad=0.0,rounding_size=0.015",
                fc=shades[i % len(shades)],
                ec="#2b4a6f",
                lw=1.2,
            )
        )
        share = net.stage_macs[i] / total
        ax.text((a + b) / 2, y0 + h / 2 + 0.06, f"stage {i}", ha="center", fontsize=10)
        ax.text(
            (a + b) / 2,
            y0 + h / 2 - 0.08,
            f"{share:.0%} of MACs",
            ha="center",
            fontsize=8,
            color="#333",
        )
    # Residual-block outputs (the candidate cut points), as ticks under the backbone.
    for c in prof.candidates:
        ax.plot([c.fraction, c.fraction], [y0 - 0.07, y0], color="#555", lw=0.8)
    ax.text(-0.005, y0 - 0.2, "candidate cut points (block outputs) ▲", fontsize=8, color="#555")
    # Exit heads above the stage boundaries.
    level, prev = 0, -1.0
    for i, name in enumerate(net.exit_names):
        x = bounds[i + 1]
        # Exits closer than a box width go one level up, so that their boxes don't overlap.
        level = level + 1 if x - prev < 0.12 else 0
        prev = x
        top = 0.85 + 0.38 * level
        ax.add_patch(
            FancyBboxPatch(
                (x - 0.055, top),
                0.11,
                0.3,
                boxstyle="round,pad=0.0,rounding_size=0.02",
                fc="#fdd49e",
                ec="#b35806",
                lw=1.2,
            )
        )
        ax.text(x, top + 0.2, f"exit {i}", ha="center", fontsize=9, weight="bold")
        ax.text(x, top + 0.06, f"c{i} = {costs[i]:.2f}", ha="center", fontsize=8)
        ax.add_patch(
            FancyArrowPatch((x, y0 + h), (x, top), arrowstyle="-|>", mutation_scale=10, color="k")
        )
        ax.text(x + 0.008, 0.62, f"after\n{name}", fontsize=7.5, color="#7f3b08", va="center")
    # Final exit: the model's own classifier.
    ax.add_patch(
        FancyBboxPatch(
            (1.015, y0 + 0.02),
            0.095,
            h - 0.04,
            boxstyle="round,pad=0.0,rounding_size=0.02",
            fc="#fdd49e",
            ec="#b35806",
            lw=1.2,
        )
    )
    ax.text(1.062, y0 + h / 2 + 0.05, "final", ha="center", fontsize=9, weight="bold")
    ax.text(
        1.062, y0 + h / 2 - 0.09, f"c{net.num_exits} = {costs[-1]:.2f}", ha="center", fontsize=8
    )
    ax.add_patch(
        FancyArrowPatch(
            (-0.085, y0 + h / 2), (0.0, y0 + h / 2), arrowstyle="-|>", mutation_scale=10
        )
    )
    ax.text(-0.088, y0 + h / 2 + 0.06, "x", fontsize=10)
    ax.annotate(
        "",
        xy=(1.0, -0.5),
        xytext=(0.0, -0.5),
        arrowprops={"arrowstyle": "-|>", "color": "#555"},
    )
    ax.text(
        0.5,
        -0.68,
        "cumulative MACs of the original resnet20 (box widths to scale)",
        ha="center",
        fontsize=8,
        color="#555",
    )
    ax.set_title(
        'earlyexit.convert(timm.create_model("resnet20"), n_exits=3, dist="pareto")',
        fontsize=10,
        family="monospace",
    )
    fig.tight_layout()
    fig.savefig(out / "eenet_resnet20.png", dpi=150)
    plt.close(fig)
    numbers["resnet20_pareto_3"] = {
        "exit_names": net.exit_names,
        "exit_costs": [round(c, 4) for c in costs],
        "stage_macs": net.stage_macs,
        "head_macs": net.head_macs,
        "total_macs": total,
        "num_candidates": len(prof.candidates),
        "parameters_backbone": sum(p.numel() for p in net.backbone.parameters()),
        "parameters_heads": sum(p.numel() for p in net.heads.parameters()),
    }


def cost_profiles(out: Path, numbers: dict) -> dict:
    """Cumulative MAC fraction over depth (candidate index) for a few real models."""
    profiles = {}
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for name, label, size in PROFILE_MODELS:
        prof = earlyexit.profile(timm.create_model(name), input_size=size)
        profiles[name] = prof
        n = len(prof.candidates)
        xs = [0.0] + [(k + 1) / n for k in range(n)]
        ys = [0.0] + [c.fraction for c in prof.candidates]
        ax.plot(xs, ys, marker="o", ms=2.5, lw=1.4, label=f"{label}: {n} cut points")
        numbers.setdefault("profiles", {})[name] = {
            "input_size": list(prof.input_size),
            "total_macs": prof.total_macs,
            "num_candidates": n,
            "first": prof.candidates[0].name,
            "last": prof.candidates[-1].name,
            "last_fraction": round(prof.candidates[-1].fraction, 4),
        }
    ax.plot([0, 1], [0, 1], color="#aaa", ls="--", lw=1, label="uniform cost per block")
    ax.set_xlabel("depth: candidate cut point k / number of candidates")
    ax.set_ylabel("cumulative MACs / total MACs")
    ax.set_title("Where the MACs go (earlyexit.profile)")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "cost_profiles.png", dpi=150)
    plt.close(fig)
    return profiles


def distributions(out: Path, numbers: dict, prof: earlyexit.FlopProfile | None = None) -> None:
    """Where each of the five rules puts 10 exits on resnet110."""
    if prof is None:
        prof = earlyexit.profile(timm.create_model("resnet110"))
    fractions = [c.fraction for c in prof.candidates]
    n_exits = 10
    fig, ax = plt.subplots(figsize=(9, 4.2))
    placements = {}
    for row, dist in enumerate(earlyexit.DISTRIBUTIONS):
        y = len(earlyexit.DISTRIBUTIONS) - 1 - row
        targets = earlyexit.distribution_targets(dist, n_exits)
        picks = place_exits(fractions, targets)
        chosen = [fractions[k] for k in picks]
        placements[dist] = {
            "targets": [round(t, 4) for t in targets],
            "exit_names": [prof.candidates[k].name for k in picks],
            "fractions": [round(f, 4) for f in chosen],
        }
        ax.hlines(y, 0, 1, color="#ccc", lw=6, zorder=0)
        ax.plot(fractions, [y] * len(fractions), "|", color="#888", ms=8, zorder=1)
        ax.plot(targets, [y + 0.22] * n_exits, "v", color=COLORS[dist], mfc="none", ms=6)
        ax.plot(chosen, [y] * n_exits, "o", color=COLORS[dist], ms=7, zorder=2)
    ax.set_yticks(range(len(earlyexit.DISTRIBUTIONS)))
    ax.set_yticklabels(list(reversed(earlyexit.DISTRIBUTIONS)))
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.6, len(earlyexit.DISTRIBUTIONS) - 0.3)
    ax.set_xlabel("cumulative MACs / total MACs of resnet110")
    ax.set_title(
        "10 exits on resnet110: ▽ target of the rule, ● the cut point chosen, | candidates",
        fontsize=10,
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "distributions_resnet110.png", dpi=150)
    plt.close(fig)
    numbers["resnet110_placements_10"] = placements


def resnet110_costs(numbers: dict) -> None:
    """The quickstart's net: its exit costs, for the home page."""
    net = earlyexit.convert(timm.create_model("resnet110"), n_exits=10, dist="pareto")
    numbers["resnet110_pareto_10"] = {
        "exit_names": net.exit_names,
        "exit_costs": [round(c, 4) for c in net.exit_costs.tolist()],
        "total_macs": net.backbone_macs,
        "head_macs": net.head_macs,
        "parameters_backbone": sum(p.numel() for p in net.backbone.parameters()),
        "parameters_heads": sum(p.numel() for p in net.heads.parameters()),
    }


#: The exit layouts of the paper's Tables 7 (SVHN) and 9 (CIFAR-10): the "Cost Percent of
#: EE-Blocks" column, per (rule, depth, N). Table 9 uses 6 exits for EENet-110 with pareto and
#: golden ratio; Table 7 uses 10.
PAPER_COST_PERCENTS = {
    ("fine", "resnet20", 3): [13, 24, 36],
    ("fine", "resnet32", 5): [8, 14, 21, 28, 35],
    ("fine", "resnet44", 6): [5, 10, 15, 20, 25, 30],
    ("fine", "resnet110", 10): [6, 11, 15, 19, 23, 27, 30, 34, 37, 41],
    ("pareto", "resnet20", 3): [24, 36, 57],
    ("pareto", "resnet32", 5): [21, 40, 54, 61, 68],
    ("pareto", "resnet44", 6): [20, 38, 53, 63, 67, 76],
    ("pareto", "resnet110", 10): [21, 37, 50, 60, 69, 74, 80, 83, 87, 91],
    ("pareto", "resnet110", 6): [21, 37, 50, 60, 69, 74],
    ("golden_ratio", "resnet20", 3): [24, 45, 68],
    ("golden_ratio", "resnet32", 5): [14, 21, 28, 40, 68],
    ("golden_ratio", "resnet44", 6): [10, 15, 20, 25, 38, 63],
    ("golden_ratio", "resnet110", 10): [2, 4, 6, 8, 10, 11, 15, 25, 39, 63],
    ("golden_ratio", "resnet110", 6): [6, 10, 15, 25, 39, 63],
    ("linear", "resnet20", 3): [36, 57, 77],
    ("linear", "resnet32", 5): [21, 35, 54, 68, 86],
    ("linear", "resnet44", 6): [15, 30, 43, 58, 76, 90],
    ("linear", "resnet110", 10): [10, 19, 28, 37, 47, 56, 65, 74, 83, 93],
}


def paper_placements(numbers: dict, profiles: dict | None = None) -> None:
    """Where the library puts the exits of the paper's Tables 7 and 9, against the paper."""
    profiles = dict(profiles or {})
    rows = []
    for (dist, depth, n_exits), paper in PAPER_COST_PERCENTS.items():
        if depth not in profiles:
            profiles[depth] = earlyexit.profile(timm.create_model(depth))
        prof = profiles[depth]
        fractions = [c.fraction for c in prof.candidates]
        picks = place_exits(fractions, earlyexit.distribution_targets(dist, n_exits))
        ours = [round(100 * fractions[k]) for k in picks]
        rows.append(
            {
                "dist": dist,
                "model": depth,
                "n_exits": n_exits,
                "paper": paper,
                "ours": ours,
                "ours_exact": [round(fractions[k], 4) for k in picks],
                "exit_names": [prof.candidates[k].name for k in picks],
                "max_abs_diff": max(abs(a - b) for a, b in zip(paper, ours)),
            }
        )
    numbers["paper_placements"] = rows
    numbers["paper_models"] = {
        depth: {
            "total_macs": prof.total_macs,
            "parameters": sum(p.numel() for p in timm.create_model(depth).parameters()),
            "num_candidates": len(prof.candidates),
        }
        for depth, prof in sorted(profiles.items())
        if depth.startswith("resnet")
        and depth[6:].isdigit()
        and int(depth[6:]) < 1000
        and depth != "resnet50"
    }


def tradeoff_digits(out: Path, numbers: dict) -> None:
    """A real accuracy-cost curve: the demo's default row, EENet-8 on digits (CPU, ~30 s)."""
    from torch.utils.data import DataLoader

    from earlyexit.calibrate import plot_tradeoff, tradeoff_curve
    from earlyexit.demo import DEFAULT_BATCH_SIZE, DEFAULT_EPOCHS, DEFAULT_LR, load_digits_data
    from earlyexit.training import evaluate, train_one_epoch

    epochs, lr, batch = DEFAULT_EPOCHS["digits"], DEFAULT_LR["digits"], DEFAULT_BATCH_SIZE["digits"]
    torch.manual_seed(0)
    train_set, test_set = load_digits_data(seed=0)
    net = earlyexit.convert(timm.create_model("resnet8", width=4), n_exits=2, dist="quadratic")
    criterion = earlyexit.EENetLoss()
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    generator = torch.Generator().manual_seed(0)
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, generator=generator)
    test_loader = DataLoader(test_set, batch_size=256)
    start = time.time()
    for epoch in range(epochs):
        train_one_epoch(net, train_loader, criterion, optimizer, epoch=epoch, progress=False)
        schedule.step()
    seconds = time.time() - start
    curve = tradeoff_curve(net, test_loader, progress=False)
    report = evaluate(net, test_loader, progress=False)
    ax = plot_tradeoff(curve)
    ax.set_title("EENet-8 on scikit-learn digits (test split, 450 images)", fontsize=9)
    ax.figure.savefig(out / "tradeoff_digits.png", dpi=150)
    plt.close(ax.figure)
    numbers["tradeoff_digits"] = {
        "setup": (
            f"resnet8 width 4, 2 quadratic exits with {net.config.exit_type} heads, "
            f"{criterion!r}, Adam lr {lr:g} annealed by a cosine, batch {batch}, {epochs} "
            "epochs, seed 0, sklearn digits upsampled to 28x28, 75/25 split (the demo's "
            "default row)"
        ),
        "train_seconds": round(seconds, 1),
        "curve": str(curve),
        "evaluate_at_0.5": str(report),
        "rows": curve.to_rows(),
    }


#: The saved speed results drawn in `speed.png` (benchmarks/results/, made by speed.py --json).
SPEED_RESULTS = (
    "speed-cpu-2core-channels-last-micro-batches.json",
    "speed-h200-eager.json",
    "speed-h200-large-batches.json",
    "speed-h200-channels-last-amp.json",
    "speed-h200-compiled.json",
)


def _load_benchmark(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def recipe_results(out: Path) -> None:
    """The training-recipe ablation's trade-off curves, from saved results: no training."""
    recipe = _load_benchmark("recipe")
    path = ROOT / "benchmarks" / "results" / "recipe.json"
    records = [recipe.Record(**r) for r in json.loads(path.read_text())]
    recipe.plot(records, str(out / "recipe.png"))


def mnist_results(out: Path) -> None:
    """EENet-8 on MNIST at the paper's 20 epochs, from the saved run of
    `examples/mnist_eenet8.py`: every model's accuracy against cost (no training)."""
    from earlyexit.demo import DemoRow, plot_demo_tradeoff
    from earlyexit.evaluation import Evaluation

    path = ROOT / "benchmarks" / "results" / "mnist-eenet8-20epochs.json"
    saved = json.loads(path.read_text())
    rows = []
    for r in saved["table2"] + saved["sweep"]:
        evaluation = None
        if r["exit_counts"] is not None and r["curve"]:
            evaluation = Evaluation(
                r["accuracy"], r["cost"], r["exit_counts"], r["exit_accuracy"],
                r["exit_costs"], sum(r["exit_counts"]), 0.5,
            )  # fmt: skip
        curve = [(p["threshold"], p["accuracy"], p["cost"]) for p in r["curve"]]
        rows.append(DemoRow(r["label"], evaluation, r["accuracy"], r["cost"], curve, 0.0))
    epochs = saved["setting"]["epochs"]
    title = f"EENet-8 on MNIST, {epochs} epochs"
    plot_demo_tradeoff(rows, out / "mnist_eenet8_20epochs.png", title)


def speed_results(out: Path) -> None:
    """Efficiency and overhead against batch size, from saved results: this measures nothing."""
    speed = _load_benchmark("speed")
    results = ROOT / "benchmarks" / "results"
    speed.plot_results(speed.load_series([results / n for n in SPEED_RESULTS]), out / "speed.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only",
        nargs="*",
        choices=FIGURES,
        help="make only these figures (default: all)",
    )
    parser.add_argument("--out", type=Path, default=ASSETS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    only = set(args.only or FIGURES)
    numbers_path = args.out / "figures.json"
    numbers = json.loads(numbers_path.read_text()) if numbers_path.exists() else {}
    numbers.update({"torch": torch.__version__, "timm": timm.__version__})
    numbers["earlyexit"] = earlyexit.__version__
    start = time.time()
    profiles = {}
    if "eenet" in only:
        eenet_diagram(args.out, numbers)
    if "profiles" in only:
        profiles = cost_profiles(args.out, numbers)
    if "distributions" in only:
        distributions(args.out, numbers, profiles.get("resnet110"))
    if "costs" in only:
        resnet110_costs(numbers)
    if "paper" in only:
        paper_placements(numbers, profiles)
    if "tradeoff" in only:
        tradeoff_digits(args.out, numbers)
    if "speed" in only:
        speed_results(args.out)
    if "recipe" in only:
        recipe_results(args.out)
    if "mnist" in only:
        mnist_results(args.out)
    numbers_path.write_text(json.dumps(numbers, indent=1) + "\n")
    print(f"wrote {sorted(p.name for p in args.out.iterdir())} in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
