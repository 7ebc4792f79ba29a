"""Imported first in a rank's fork server (plumbing.process.helper_server names it among the modules the
server preloads): the server dies with the rank that started it.

Each helper the server forks keeps the server's "alive" pipe open (Lib/multiprocessing/forkserver.py:
a child inherits it to start helpers of its own), so the server, which waits for that pipe to close,
would outlive a rank killed outright as long as its loader workers live, and they, dying only with
their parent (the server), would live on too. The parent's pid comes in the environment, set for the
server's start alone; anywhere else this module does nothing."""

from __future__ import annotations

import os

from plumbing.process import die_with_parent

PARENT = "HELPER_SERVER_PARENT"

if os.environ.get(PARENT) == str(os.getppid()):
    die_with_parent(os.getppid())
