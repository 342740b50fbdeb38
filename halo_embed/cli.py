"""The ``halo-embed`` command line.

User mistakes (bad paths, bad values) print one readable line and exit with
status 2; set ``HALO_EMBED_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main"]


class CLIError(Exception):
    """A user mistake reported as one line by :func:`main`."""


def _demo(args: argparse.Namespace) -> None:
    from .recipes.digits import run

    run_dir = Path(args.output)
    print("halo-embed demo: cross-entropy vs HALO on scikit-learn digits 0-6; digits 7-9 and noise never seen")
    result = run(run_dir=run_dir, progress=True)
    print(result["summary_table"])
    print(f"report: {run_dir / 'report.md'}")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="halo-embed", description="Train and evaluate embedding models with the HALO loss."
    )
    parser.add_argument("--version", action="version", version=f"halo-embed {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser("demo", help="a tour of HALO on embedded data, offline, in minutes")
    demo.add_argument("--output", default="runs/demo", help="run folder for report.md, metrics.json and plots")
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], None] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        handler(args)
    except (CLIError, ValueError, TypeError, OSError, ImportError) as error:
        if os.environ.get("HALO_EMBED_DEBUG"):
            raise
        print(f"halo-embed {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
