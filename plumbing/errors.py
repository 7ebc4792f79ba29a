"""Errors for people: a `UserError` is printed as one line and the process exits 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input (a file, a key, a line) that the user can fix. The message names it."""


#: Exit code of a command that refused its input.
EXIT_USAGE = 2


def run_cli(prog: str, main: Callable[[], int | None]) -> int:
    """Run `main`, turning a `UserError` into `prog: error: <one line>` and exit code 2. Under a
    multi-process launcher every rank meets the same error: only rank 0 prints it."""
    try:
        return main() or 0
    except UserError as err:
        if _rank() == 0:
            message = " ".join(str(err).split())  # one line, whatever the message held
            print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def _rank() -> int:
    from plumbing.dist import DistInfo  # here, not at the top: dist imports this module

    try:
        return DistInfo.from_env().rank
    except UserError:
        return 0
