"""The per-phase memory record of a run: each rank's peak in every phase (model built, `initialize`,
resume, forward, backward, optimizer step, evaluation, checkpoint, export, its check), what the
engine holds at the end of each phase's first pass (trainer/memory/census.py), written by rank 0 to
`<run>/memory.json` beside the plan made before the run, and to TensorBoard (memory/…).

Phases do not nest: a phase starts by marking the gauge (the CPU high-water mark is one per process),
and what happens between phases (the loader's batches, the loss, logging) is recorded as "between".
The loop's phases come from a thin wrapper around the engine (`Watched`): a call with gradients on is
"forward", without them "evaluate"; `backward`, `step`, `save_checkpoint`, `load_checkpoint` are theirs.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from plumbing.dist import DistInfo, gather_objects
from plumbing.files import atomic_write_json
from trainer.memory.census import engine_census
from trainer.memory.host import Gauge, give_back

log = logging.getLogger("trainer.memory")
FILE = "memory.json"
FORMAT = 1
# In the order a run meets them; "between" is whatever ran outside any phase.
PHASES = (
    "build",
    "initialize",
    "convert",
    "resume",
    "forward",
    "backward",
    "step",
    "evaluate",
    "checkpoint",
    "export",
    "verify",
    "between",
)
TRAINING = ("forward", "backward", "step")
MiB = 2**20


@dataclass
class PhaseRecord:
    peak: int = 0  # bytes: the highest peak over every pass of the phase
    start: int = 0  # bytes held when its first pass began
    end: int = 0  # bytes held when its first pass ended
    passes: int = 0
    seconds: float = 0.0  # over every pass
    held: dict[str, int] = field(default_factory=dict)  # the engine's census after the first pass


class MemoryRecorder:
    """One rank's record. `phase(name)` around each piece of work; `watch(engine)` for the loop's."""

    def __init__(self, device: str, info: DistInfo, enabled: bool = True) -> None:
        self.enabled, self.info = enabled, info
        self.gauge = Gauge(device)
        self.runtime = self.gauge.now() if enabled else 0  # the process before any model: torch, libraries
        self.phases: dict[str, PhaseRecord] = {}
        self.engine: Any = None
        self.current: str | None = None
        if enabled:
            self.gauge.mark()

    @contextlib.contextmanager
    def phase(self, name: str, trim: bool = False) -> Iterator[None]:
        """Record `name`'s peak; with `trim`, hand the heap's freed pages back at its end (after a phase
        that frees much: the whole model partitioned away by `initialize`, an export's state dict)."""
        if not self.enabled or self.current is not None:  # nested: the outer phase holds the peak
            yield
            return
        self._close("between")
        record = self.phases.setdefault(name, PhaseRecord())
        first = record.passes == 0
        if first:
            record.start = self.gauge.now()
        self.gauge.mark()
        self.current, began = name, time.perf_counter()
        try:
            yield
        finally:
            self.current = None
            if trim:
                give_back()
            record.seconds += time.perf_counter() - began
            record.passes += 1
            record.peak = max(record.peak, self.gauge.peak())
            if first:
                record.end = self.gauge.now()
                if self.engine is not None:
                    record.held = engine_census(self.engine)
            self.gauge.mark()

    def _close(self, name: str) -> None:
        """The peak since the last phase ended, as `name` (one record for all the time between phases)."""
        record = self.phases.setdefault(name, PhaseRecord())
        record.peak = max(record.peak, self.gauge.peak())
        record.passes += 1

    def watch(self, engine: Any) -> Any:
        """The engine, its loop-facing calls recorded as phases (the census from now on reads it)."""
        self.engine = engine
        return Watched(engine, self) if self.enabled else engine

    def forget_engine(self) -> None:
        self.engine = None

    def rank_record(self) -> dict[str, Any]:
        self._close("between")
        return {
            "rank": self.info.rank,
            "node": self.info.node_name,
            "runtime_bytes": self.runtime,
            "phases": {
                name: asdict(self.phases[name])
                for name in PHASES
                if name in self.phases and self.phases[name].peak
            },
        }

    def write(self, run_dir: Path, plan: dict[str, Any] | None, monitor: Any, step: int) -> None:
        """Every rank's record gathered (a collective: every rank calls), written by rank 0 to
        memory.json and TensorBoard (memory/rank<R>/<phase>_peak_mb), and logged as a table."""
        if not self.enabled:
            return
        ranks = gather_objects(self.rank_record())
        if not self.info.is_main:
            return
        payload = {
            "format": FORMAT,
            "device": "cuda" if self.gauge.cuda else "cpu",
            "measure": self.gauge.measure,
            "world_size": self.info.world_size,
            "ranks_per_node": self.info.local_world_size,
            "phases": [p for p in PHASES if any(p in r["phases"] for r in ranks)],
            "plan": plan,
            "ranks": ranks,
        }
        atomic_write_json(run_dir / FILE, payload)
        values = {
            f"memory/rank{r['rank']}/{name}_peak_mb": rec["peak"] / MiB
            for r in ranks
            for name, rec in r["phases"].items()
        }
        monitor.scalars(step, values)
        for line in table(payload).splitlines():
            log.info("%s", line)


def table(payload: dict[str, Any]) -> str:
    """memory.json as a table: each phase's peak on every rank (MiB), and the plan's total beside it."""
    ranks = payload["ranks"]
    head = f"{'phase':12s}" + "".join(f"{'rank ' + str(r['rank']):>12s}" for r in ranks)
    lines = [f"memory per phase ({payload['measure']}), MiB", head]
    for name in payload["phases"]:
        cells = [r["phases"].get(name, {}).get("peak", 0) / MiB for r in ranks]
        lines.append(f"{name:12s}" + "".join(f"{c:12.0f}" for c in cells))
    plan = payload.get("plan") or {}
    if plan.get("total"):
        lines.append(f"{'plan':12s}{plan['total'] / MiB:12.0f} per rank (trainer/memory/estimate.py)")
    return "\n".join(lines)


class Watched:
    """The DeepSpeed engine with its forward, backward, step and checkpoint calls recorded as phases;
    everything else passes through untouched."""

    def __init__(self, engine: Any, recorder: MemoryRecorder) -> None:
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_recorder", recorder)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._engine, name, value)

    def _in(self, phase: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        with self._recorder.phase(phase):
            return call(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        phase = "forward" if torch.is_grad_enabled() and self._engine.training else "evaluate"
        return self._in(phase, self._engine, *args, **kwargs)

    def backward(self, loss: torch.Tensor) -> Any:
        return self._in("backward", self._engine.backward, loss)

    def step(self) -> None:
        self._in("step", self._engine.step)

    def save_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return self._in("checkpoint", self._engine.save_checkpoint, *args, **kwargs)

    def load_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        return self._in("resume", self._engine.load_checkpoint, *args, **kwargs)
