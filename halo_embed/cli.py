"""The ``halo-embed`` command line: one subcommand per module (:data:`COMMANDS`: the recipes, and
:mod:`halo_embed.commands` for scoring and calibration); every command's exit status and error handling come
from :mod:`halo_embed.exit_status`."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from .exit_status import EXIT_CODES, run_handler

__all__ = ["main"]

#: subcommand -> the module that runs it: ``HELP``, ``add_arguments(parser)``, ``run(args)`` and
#: ``CLI_DESCRIPTION`` (else its docstring); imported when the parser is built
COMMANDS = {"demo": "halo_embed.recipes.demo", "score": "halo_embed.commands.score",
            "calibrate": "halo_embed.commands.calibrate", "filter": "halo_embed.commands.filter",
            "finetune": "halo_embed.recipes.clip_finetune",
            "wise-ft": "halo_embed.recipes.wise_ft", "cifar": "halo_embed.recipes.cifar"}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="halo-embed", description="Train and evaluate embedding models with the HALO loss.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"halo-embed {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        description = getattr(module, "CLI_DESCRIPTION", module.__doc__)
        sub = subparsers.add_parser(name, help=module.HELP, description=description, epilog=EXIT_CODES,
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
