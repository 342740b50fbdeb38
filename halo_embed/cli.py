"""The ``halo-embed`` command line.

User mistakes (bad paths, bad values) print one readable line and exit with
status 2; set ``HALO_EMBED_DEBUG=1`` to see the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Callable, Sequence

__all__ = ["main"]

#: subcommand -> module under halo_embed.commands (imported only when run)
COMMANDS = {"demo": "demo", "score": "score", "finetune": "finetune", "cifar": "cifar"}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="halo-embed", description="Train and evaluate embedding models with the HALO loss."
    )
    parser.add_argument("--version", action="version", version=f"halo-embed {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"halo_embed.commands.{module_name}")
        sub = subparsers.add_parser(name, help=module.HELP, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(handler=module.run)
    return parser


def run_handler(command: str, handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand; a user mistake becomes one line on stderr and exit status 2."""
    try:
        return int(handler(args) or 0)
    except (ValueError, TypeError, OSError, ImportError) as error:
        if os.environ.get("HALO_EMBED_DEBUG"):
            raise
        print(f"halo-embed {command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"halo-embed {command}: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    return run_handler(args.command, args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
