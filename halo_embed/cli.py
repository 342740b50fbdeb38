"""The ``halo-embed`` command line: one subcommand per module of :mod:`halo_embed.commands`, imported only
when run; every command's exit status and error handling come from :mod:`halo_embed.exit_status`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .exit_status import EXIT_CODES, run_handler

__all__ = ["main"]

#: subcommand -> module under halo_embed.commands (imported only when run)
COMMANDS = {"demo": "demo", "score": "score", "calibrate": "calibrate", "finetune": "finetune", "wise-ft": "wise_ft",
            "cifar": "cifar"}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="halo-embed", description="Train and evaluate embedding models with the HALO loss.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"halo-embed {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"halo_embed.commands.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.__doc__, epilog=EXIT_CODES,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return run_handler(args.command, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
