"""Logging and progress bars: one format for every job, quiet on every rank but the first."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

FORMAT = "%(asctime)s %(levelname).1s [%(name)s%(rank)s] %(message)s"


class _RankFilter(logging.Filter):
    def __init__(self, rank: int | None) -> None:
        super().__init__()
        self.rank = "" if rank is None else f" r{rank}"

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup_logging(rank: int | None = None, log_file: Path | None = None, verbose: bool = False) -> None:
    """Console: INFO on rank 0 (or single process), WARNING elsewhere unless `verbose`. File: INFO."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.INFO)
    formatter = logging.Formatter(FORMAT, datefmt="%H:%M:%S")
    console = _TqdmHandler()
    console.setLevel(logging.INFO if (rank in (None, 0) or verbose) else logging.WARNING)
    handlers: list[logging.Handler] = [console]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_RankFilter(rank))
        root.addHandler(handler)
    # Libraries that print on every import or load: keep their warnings, drop their chatter.
    for noisy in ("transformers", "diffusers", "DeepSpeed", "deepspeed", "torch.distributed", "tensorboard"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime" on CPU
    quiet_hf_progress()


def quiet_hf_progress() -> None:
    """Hugging Face draws a bar for every save and load of a small folder: keep ours only. Libraries not
    imported yet are told through their environment variables (importing diffusers and transformers
    here only to silence them cost seconds and ~170 MB on runs that never use one); call this again
    after importing diffusers, which reads no such variable for its bars."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    for name in ("transformers", "diffusers"):
        if name in sys.modules:
            module = sys.modules[name]
            module.utils.logging.disable_progress_bar()
            module.utils.logging.set_verbosity_error()


class _TqdmHandler(logging.StreamHandler):
    """Console lines printed above any progress bar instead of through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def progress(total: int | None, desc: str, unit: str, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar with a rate in `unit`/s, on a terminal only: in a log file (Slurm, CI) the jobs write
    plain log lines instead."""
    interactive = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not (enabled and interactive),
        mininterval=0.5 if interactive else 10.0,
        dynamic_ncols=interactive,
        file=sys.stderr,
        **kwargs,
    )
