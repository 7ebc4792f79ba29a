"""Shared test helpers: tiny datasets made by the real data_prep, and running the real entry points."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from torch.utils.data import IterableDataset

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

SMALL = [
    "synthetic.cifar_per_batch=64",
    "synthetic.cifar_test=64",
    "synthetic.flickr_train=128",
    "synthetic.flickr_dev=16",
    "synthetic.flickr_test=48",
]


def env(**extra: str) -> dict[str, str]:
    out = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    out.update(extra)
    return out


def run(
    args: list[str], timeout: float = 600, check: bool = True, cwd: Path = ROOT, **extra: str
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, env=env(**extra), cwd=cwd, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


def prep_small(root: Path) -> dict[str, Path]:
    """Synthetic data in the official formats → shards, through the real commands (40 samples a shard)."""
    raw = root / "raw"
    run([PY, "-m", "data_prep", "synthetic", "--out", str(raw), *SMALL])
    run(
        [
            PY,
            "-m",
            "data_prep",
            "cifar10",
            "--source",
            str(raw / "cifar-10-python.tar.gz"),
            "--no-verify",
            "--out",
            str(root / "cifar10"),
            "--shard-size",
            "40",
            "--quiet",
        ]
    )
    run(
        [
            PY,
            "-m",
            "data_prep",
            "flickr8k",
            "--images",
            str(raw / "Flickr8k_Dataset.zip"),
            "--captions",
            str(raw / "Flickr8k_text.zip"),
            "--out",
            str(root / "flickr8k"),
            "--shard-size",
            "40",
            "--quiet",
        ]
    )
    return {
        "cifar10": root / "cifar10" / "manifest.json",
        "flickr8k": root / "flickr8k" / "manifest.json",
        "raw": raw,
    }


def trainer_args(
    manifest: Path, run_dir: Path, *overrides: str, config: str = "configs/demo-cifar10.yaml"
) -> list[str]:
    """A tiny, fast run of the real config: batch 16, 2 loader workers, a log line every step."""
    return [
        "--config",
        str(ROOT / config),
        f"data.manifest={manifest}",
        f"run.dir={run_dir}",
        "train.batch_size=16",
        "train.epochs=2",
        "run.log_every=1",
        "data.workers=2",
        "data.shuffle_buffer=50",
        "eval.batch_size=32",
        "optim.warmup_steps=5",
        *overrides,
    ]


def launcher(nproc: int, module: str = "trainer") -> list[str]:
    """The command that starts `module` on `nproc` local ranks with torchrun."""
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m", module]


def torchrun(
    nproc: int, args: list[str], check: bool = True, timeout: float = 600, module: str = "trainer"
) -> subprocess.CompletedProcess[str]:
    return run([*launcher(nproc, module), *args], timeout=timeout, check=check)


def sampler_args(model: Path, out: Path, *overrides: str) -> list[str]:
    """configs/sample.yaml on an already built model folder, writing to `out`."""
    return [
        "--config",
        str(ROOT / "configs/sample.yaml"),
        f"model={model}",
        "preset=''",
        f"out_dir={out}",
        *overrides,
    ]


def scalars(tb_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def tags(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


class WhoServes(IterableDataset):
    """A loader dataset (picklable by name: a fork server's worker imports it) whose one batch says
    which process served it: its parent, its blocked and ignored stop signals, its memory."""

    def __iter__(self) -> Iterator[dict[str, object]]:

        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        yield {
            "ppid": os.getppid(),
            "term_quiet": signal.SIGTERM in blocked or signal.getsignal(signal.SIGTERM) == signal.SIG_IGN,
            "has_ballast": "BALLAST" in globals(),
        }
