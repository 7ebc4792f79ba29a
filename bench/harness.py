"""The trainer's own loop over in-memory batches, for benchmarks that time a step as the loop runs it
(micro-step with its guard, monitor, counters, watchdog; no loader, checkpoints or evaluation)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch

from plumbing.dist import DistInfo
from plumbing.watchdog import Watchdog
from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import TrainConfig
from trainer.data import Layout
from trainer.engine import BatchSizes, build_engine
from trainer.evaluate import Evaluator
from trainer.loop import Loop, Parts
from trainer.monitor import Monitor
from trainer.plan import Plan
from trainer.run import RunFolder
from trainer.tasks import make_task
from trainer.tasks.base import Task

# What a timed loop must not do between steps: checkpoint, evaluate.
QUIET = (
    "checkpoint.at_epoch_end=false",
    "checkpoint.every_steps=0",
    "eval.at_start=false",
    "eval.every_epochs=0",
)


class InMemory:
    """The loop's data source, serving the same batches every epoch (no loader in the timing)."""

    def __init__(self, data: list[dict[str, Any]]) -> None:
        self.data = data

    def epoch(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        yield from self.data[start:]


class TrainerLoop:
    """`trainer.loop.Loop` on one rank with the config's task and engine, fed `InMemory` batches."""

    def __init__(self, cfg: TrainConfig, run: RunFolder, name: str, batch: int, device: str = "cpu") -> None:
        one = DistInfo.from_env({})
        self.task: Task = make_task(cfg, run, one, device)
        steps = 1  # each epoch() plans its own
        torch.manual_seed(0)
        engine = build_engine(
            self.task.build(), cfg.deepspeed, cfg.optim, BatchSizes(batch, 1, 1), 10**6, device
        )
        plan = Plan(Layout(1, 1, batch, steps * batch), 1, 10**6, steps, 10**6, 10**6, steps * batch)
        ckpt = Checkpointer(cfg.checkpoint, run.root / f"checkpoints-{name}", one)
        monitor = Monitor(run.root / name, True, device, cfg.run.log_every, plan.total, 0)
        monitor.bar.disable = True
        evaluator = Evaluator(cfg.eval, self.task, list)
        # armed twice a micro-step, as in a real run, with a limit no turn reaches: a bench's runners take
        # turns, and one waiting for its next turn on a loaded machine is not hung
        day = dataclasses.replace(cfg.watchdog, step_s=86400.0, startup_s=86400.0)
        watchdog = Watchdog(day, 0)
        parts = Parts(self.task, InMemory([]), engine, ckpt, evaluator, monitor, watchdog)  # type: ignore[arg-type]
        self.loop = Loop(cfg, plan, parts, TrainState.of(plan.layout), 0)

    def epoch(self, data: list[dict[str, Any]]) -> None:
        """One pass of the loop over `data` (the loop's own epoch: it stops after the planned count)."""
        self.loop.data = InMemory(data)  # type: ignore[assignment]
        self.loop.plan = Plan(self.loop.plan.layout, 1, 10**6, len(data), 10**6, 10**6, 0)
        self.loop.state.micro_in_epoch = 0
        self.loop.epoch()
