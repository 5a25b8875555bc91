"""The `earlyexit` command.

earlyexit profile MODEL [--n-exits N] [--input-size C H W]
earlyexit demo [--dataset digits|mnist] [--data-dir DIR] ...
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _profile(args: argparse.Namespace) -> int:
    import timm

    import earlyexit
    from earlyexit.placement import DISTRIBUTIONS, distribution_targets, place_exits

    kwargs = {}
    if args.num_classes is not None:
        kwargs["num_classes"] = args.num_classes
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    prof = earlyexit.profile(model, tuple(args.input_size) if args.input_size else None)
    print(f"{args.model} at input size {prof.input_size}: {len(prof.candidates)} candidates")
    print(prof)
    fractions = [c.fraction for c in prof.candidates]
    print(f"\nwhere each rule puts {args.n_exits} exits (candidate index: cost fraction):")
    for dist in DISTRIBUTIONS:
        try:
            picks = place_exits(fractions, distribution_targets(dist, args.n_exits))
            row = "  ".join(f"{k}:{fractions[k]:.2f}" for k in picks)
        except earlyexit.PlacementError as err:
            row = f"(cannot place: {err})"
        print(f"  {dist:<13} {row}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from earlyexit.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="earlyexit", description="Early-exit networks (EENets) for timm and torchvision."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("profile", help="list a timm model's candidate exits and placements")
    p.add_argument("model", help="a timm model name, e.g. resnet110")
    p.add_argument("--n-exits", type=int, default=3, help="exits to place (default 3)")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), default=None)
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=_profile)

    from earlyexit.demo import add_demo_arguments

    d = sub.add_parser("demo", help="train EENet-8 on built-in data and compare the losses")
    add_demo_arguments(d)
    d.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `earlyexit` command."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
