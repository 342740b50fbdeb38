"""``halo-embed demo``: the three jobs of halo-embed on embedded data, offline, in a few minutes.

(a) cross-entropy vs HALO with unknown classes on scikit-learn's digits,
(b) a short CLIP-style HALO fine-tune on the built-in rendered shapes,
(c) a few pairs scored with the built-in accept/reject threshold.
Writes runs/demo/report.md (runs/demo-2/, -3/, ... when that folder is taken: a run never overwrites another).
"""

from __future__ import annotations

import argparse

HELP = "a tour of HALO on embedded data, offline, in minutes"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="runs/demo",
                        help="run folder for report.md, metrics.json and plots (a taken one gets a -2, -3 ... suffix)")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from ..io import unused_path
    from ..recipes.demo import run as run_demo

    run_demo(unused_path(args.output), progress=args.progress)
    return 0
