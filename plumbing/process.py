"""How a process ends: an entry point flushed, then without the interpreter's teardown; a helper process with its parent."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import sys
from typing import NoReturn


def exit_now(code: int) -> NoReturn:
    """Exit with `code` once logs and stdio are flushed and the atexit handlers have run (loader
    workers joined, writers closed), skipping the teardown of every imported module.

    That teardown is pure cost: with torch, torchvision, transformers and DeepSpeed loaded it took
    2.6 s of every run here (one rank of the tiny CLIP trains ~20 steps in that time), and C++
    destructors at that point are where gloo jobs sometimes aborted after good work ("terminate
    called without an active exception", shared/notes/stack-on-cpu.md). For `python -m …` entry
    points only: code that calls a stage in-process returns normally."""
    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: nothing more can be said
                pass
    finally:
        os._exit(code)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when its parent dies (prctl(2) PR_SET_PDEATHSIG), and exit
    now if it already has. For helper processes (loader workers) that ignore SIGTERM by design: a
    parent killed outright (SIGKILL, the OOM killer, a watchdog) would otherwise leave them running,
    reparented to init, one more with every restart. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above: nothing will signal us
        os._exit(1)


def helper_server(modules: list[str]) -> int:
    """Start this process's fork server (multiprocessing's "forkserver"), with `modules` imported in it,
    and return its pid: the parent of the helper processes (loader workers) started from it after.

    Forked from the fork server, a helper holds none of this process's memory or state: not the model
    and optimizer pages a fork copy-on-write keeps alive in every loader worker as the rank updates
    them (933 MiB per worker at ViT-L/14 shapes, bench/memory.py), and not a lock another thread held
    at the moment of a fork (a worker that hangs as it starts: docs/RELIABILITY.md). It is started
    with SIGTERM and SIGUSR1 blocked, a mask the server and every helper inherit: Slurm signals every
    process of a step, and the trainer, not its helpers, answers (see `trainer.data`). The server dies
    with this process (plumbing.server_dies_with_parent), and its helpers with it. The resource
    tracker is started first: starting it unblocks SIGTERM in the caller (Lib/multiprocessing/
    resource_tracker.py, ensure_running), which the mask must outlast."""
    from multiprocessing import forkserver, get_context, resource_tracker

    from plumbing.server_dies_with_parent import PARENT

    get_context("forkserver").set_forkserver_preload(["plumbing.server_dies_with_parent", *modules])
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
    os.environ[PARENT] = str(os.getpid())
    try:
        forkserver.ensure_running()  # a fork and exec: the server imports `modules` on its own
    finally:
        del os.environ[PARENT]
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]  # no public accessor (3.11–3.13)
