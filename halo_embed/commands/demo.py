"""``halo-embed demo``: a tour of HALO on embedded data, offline, in minutes."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "a tour of HALO on embedded data, offline, in minutes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo", help="run folder for report.md, metrics.json and plots")


def run(args: argparse.Namespace) -> int:
    from ..recipes.digits import run as run_digits

    run_dir = Path(args.output)
    print("halo-embed demo: cross-entropy vs HALO on scikit-learn digits 0-6; digits 7-9 and noise never seen")
    result = run_digits(run_dir=run_dir, progress=True)
    print(result["summary_table"])
    print(f"report: {run_dir / 'report.md'}")
    return 0
