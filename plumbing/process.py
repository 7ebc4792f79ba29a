"""How a command-line entry point ends: flushed, then without the interpreter's teardown."""

from __future__ import annotations

import atexit
import logging
import os
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
