"""Errors for people: a `UserError` is printed as one line and the process exits 2, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """Bad input (a file, a key, a line) that the user can fix. The message names it."""


class LocalError(UserError):
    """Bad input that one rank finds alone (a shard it reads): that rank prints it, whichever it is."""


#: Exit code of a command that refused its input.
EXIT_USAGE = 2


def run_cli(prog: str, main: Callable[[], int | None]) -> int:
    """Run `main`, turning a `UserError` into `prog: error: <one line>` and exit code 2. Under a
    multi-process launcher every rank meets the same error: only rank 0 prints it (a `LocalError`
    is printed by the rank that met it)."""
    try:
        return main() or 0
    except UserError as err:
        if isinstance(err, LocalError) or _rank() == 0:
            print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def one_line(err: UserError) -> str:
    """The message on one line. Raised in a DataLoader worker, it comes back wrapped with the worker's
    traceback ("Caught UserError in DataLoader worker process 0. Original Traceback …"): the message is
    the traceback's last line."""
    text = str(err)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(f"{type(err).__name__}: ", 1)[-1]
    return " ".join(text.split())


def _rank() -> int:
    from plumbing.dist import DistInfo  # here, not at the top: dist imports this module

    try:
        return DistInfo.from_env().rank
    except UserError:
        return 0
