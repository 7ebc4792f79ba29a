"""The drill's frame: how big it runs, one step's outcome, and running a step (a real entry point in a
subprocess, its log kept, its time bounded) without ever stopping the drill."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
# Dense bf16 peak, TFLOP/s (vendor data sheets, SXM parts).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass(frozen=True)
class Size:
    """How big the drill runs: the real one on a GPU, or tiny on a CPU."""

    clip: str  # model.preset
    image: int  # side of the synthetic JPEGs
    train: int  # Flickr8k-format training images
    test: int
    batch: int  # per GPU
    steps: int  # optimizer steps before the checkpoint
    more: int  # steps after resume=auto
    workers: int
    sweep: tuple[int, ...]  # the CLIP step's batch sweep (in-memory batches)
    diffusion: str  # the sampler's preset
    side: int  # sampler image side
    sample_steps: int
    prompts: int  # at batch 8 (three batches: two steady ones after the first)
    unet_batch: int  # the U-Net's training batch per GPU
    unet_steps: int


GPU = Size("vit-b-32", 256, 4096, 1024, 256, 60, 10, 8, (64, 256, 512), "sd-v1", 512, 25, 24, 8, 30)
TINY = Size("tiny", 96, 64, 32, 16, 4, 2, 1, (4, 8, 16), "tiny", 64, 2, 24, 4, 3)


class StepFailed(Exception):
    """A step that did not do its job; `detail` is what the table shows (the log's first lines)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass
class Outcome:
    step: str
    status: str  # "ok", "failed" or "not run"
    seconds: float = 0.0
    detail: str = ""


class Base:
    def __init__(self, work: Path, size: Size, tiny: bool, budget: float = float("inf")) -> None:
        self.work, self.size, self.tiny, self.budget = work, size, tiny, budget
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
        self.outcomes: dict[str, Outcome] = {}
        self.started = time.perf_counter()
        self.manifest = work / "flickr8k" / "manifest.json"

    def attempt(self, step: str, action: Any, needs: tuple[str, ...] = ()) -> Any:
        """Run one step and record its outcome; never raises. A step whose `needs` did not all succeed,
        or that would start after the time budget, is "not run" and says why."""
        missing = [n for n in needs if n not in self.outcomes or self.outcomes[n].status != "ok"]
        elapsed = time.perf_counter() - self.started
        if missing:
            why = f"needs {', '.join(missing)}, which did not succeed"
            self.outcomes[step] = Outcome(step, "not run", detail=why)
        elif elapsed > self.budget:
            self.outcomes[step] = Outcome(step, "not run", detail=f"time budget of {self.budget:.0f} s spent")
        else:
            start = time.perf_counter()
            try:
                value = action()
            except StepFailed as err:
                self.outcomes[step] = Outcome(step, "failed", time.perf_counter() - start, err.detail)
            except Exception as err:  # a failure in the drill's own checks is a failed step, not the end
                detail = "".join(traceback.format_exception(err)[-6:])
                self.outcomes[step] = Outcome(step, "failed", time.perf_counter() - start, detail)
            else:
                self.outcomes[step] = Outcome(step, "ok", time.perf_counter() - start)
                return value
        outcome = self.outcomes[step]
        print(f"  {step}: {outcome.status.upper()}: {outcome.detail.splitlines()[0]}", flush=True)
        return None

    def run(self, step: str, args: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
        """One real entry point, as a user runs it; its output goes to <work>/logs/<step>.log."""
        print(f"$ {' '.join(short(a) for a in args)}", flush=True)
        log = self.work / "logs" / f"{step}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        timeout = min(timeout, max(10.0, self.budget + 60 - (start - self.started)))
        try:
            proc = subprocess.run(
                args, cwd=ROOT, env=env or self.env, capture_output=True, text=True, timeout=timeout
            )
        except subprocess.TimeoutExpired as err:
            text = _text(err.stdout) + "\n" + _text(err.stderr)
            log.write_text(text)
            raise StepFailed(f"ran past {timeout:.0f} s\n{failure_lines(text)}") from None
        text = proc.stdout + "\n" + proc.stderr
        log.write_text(text)
        if proc.returncode != 0:
            raise StepFailed(f"exit code {proc.returncode}\n{failure_lines(text)}")
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
        return text

    def run_json(self, step: str, args: list[str], timeout: float) -> dict[str, Any]:
        """A measuring script run as a step (`--out FILE` appended): what it wrote."""
        out = self.work / f"{step}.json"
        self.run(step, [*args, "--out", str(out)], timeout)
        return dict(json.loads(out.read_text()))

    def ok(self, step: str) -> bool:
        return step in self.outcomes and self.outcomes[step].status == "ok"


def torch_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def torchrun(nproc: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(nproc),
        "-m",
        "trainer",
    ]


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def failure_lines(text: str, count: int = 12) -> str:
    """The lines of a log that say what went wrong: from the first error-looking line, else its end."""
    lines = [line for line in text.splitlines() if line.strip()]
    markers = ("Traceback", "Error", "error:", "FAILED", "Killed", "CUDA", "NCCL")
    first = next((i for i, line in enumerate(lines) if any(m in line for m in markers)), None)
    chosen = lines[first : first + count] if first is not None else lines[-count:]
    if lines and lines[-1] not in chosen:  # a traceback's last line is its message
        chosen += ["…", *lines[-3:]]
    return "\n".join(chosen)


def short(arg: str) -> str:
    return arg.replace(str(ROOT) + "/", "").replace(sys.executable, "python")


def scalars(tb: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def memory_record(run_dir: Path) -> dict[str, Any] | None:
    """The trainer's per-phase memory record (trainer/memory/recorder.py: each rank's peak per phase,
    torch.cuda.max_memory_allocated on a GPU, and the plan made before launch), if the run wrote one."""
    path = run_dir / "memory.json"
    return json.loads(path.read_text()) if path.is_file() else None


def steady(values: dict[int, float], last: int) -> float:
    """The median over the logged steps of the first run, leaving out the first log window (warm-up)."""
    kept = [v for step, v in sorted(values.items()) if step <= last][1:] or list(values.values())
    return statistics.median(kept) if kept else float("nan")
