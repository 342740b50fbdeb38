"""Exit status and error handling, the same for every ``halo-embed`` command and ``python -m`` recipe.

- 0: everything done;
- 1: done, but some input rows were rejected (each reported on stderr);
- 2: a usage or input error (bad option, missing or damaged file): one
  readable line on stderr, nothing trained or written;
- 3: an internal error: one line on stderr naming a log file that holds the
  traceback.

Set ``HALO_EMBED_DEBUG=1`` to get the traceback itself instead of the line.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

__all__ = ["EXIT_CODES", "run_handler"]

EXIT_CODES = """exit status: 0 done; 1 some input rows rejected (reported); 2 usage or input error;
3 internal error (the traceback is written to a log file named on stderr)"""


def run_handler(command: str, handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a subcommand: a user mistake becomes one line and status 2, a crash one line, a log and status 3."""
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
    except Exception as error:  # a bug, not a user mistake: keep the traceback, in a file
        if os.environ.get("HALO_EMBED_DEBUG"):
            raise
        log = _write_crash_log(command)
        print(f"halo-embed {command}: internal error: {type(error).__name__}: {error} (traceback in {log})",
              file=sys.stderr)
        return 3


def _write_crash_log(command: str) -> str:
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix=f"halo-embed-{command}-", suffix=".log")
    with os.fdopen(fd, "w") as handle:
        handle.write(f"halo-embed {command} {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path
