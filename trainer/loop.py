"""The training loop: epochs of micro-steps, with the checkpoint, evaluation, signal and divergence
checks between them. It runs any task; the task only turns a batch into a loss.

A test hook: with TRAINER_RECORD_KEYS naming a folder, every rank appends `<epoch>\t<key>` for each
sample it trained to `keys-rank<R>.tsv` there (tests/test_resume_world.py checks with it that an epoch
resumed on another number of ranks trains every sample once).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plumbing.config import to_dict
from plumbing.dist import all_min, all_sum
from plumbing.errors import UserError
from plumbing.seeds import derive_seed
from plumbing.watchdog import Watchdog, WatchdogConfig
from trainer.checkpoint import Checkpointer, TrainState
from trainer.config import TrainConfig
from trainer.data import TrainData
from trainer.engine import Engine, device_skippable, group_names, trainable_shapes
from trainer.evaluate import Evaluator
from trainer.guard import StepGuard
from trainer.monitor import Monitor, StepStats, Stopwatch
from trainer.plan import Plan
from trainer.tasks.base import Batch, Evaluation, Task

log = logging.getLogger("trainer")
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed on a signal; run again (or requeue) to continue


@dataclass
class Parts:
    """What a run is made of, built by `train()` in this order."""

    task: Task
    data: TrainData
    engine: Engine
    ckpt: Checkpointer
    evaluator: Evaluator
    monitor: Monitor
    watchdog: Watchdog = field(default_factory=lambda: Watchdog(WatchdogConfig(step_s=0), 0))  # off


@dataclass
class MicroStep:
    loss: torch.Tensor  # detached
    finite: bool
    boundary: bool  # an optimizer step was taken (or, skipped on the device, counted as one)
    stop: bool  # some rank received a stop signal
    scalars: dict[str, torch.Tensor]


class Loop:
    def __init__(self, cfg: TrainConfig, plan: Plan, parts: Parts, state: TrainState, rank: int) -> None:
        self.cfg, self.plan, self.state, self.rank = cfg, plan, state, rank
        self.task, self.engine, self.data = parts.task, parts.engine, parts.data
        self.ckpt, self.evaluator, self.monitor = parts.ckpt, parts.evaluator, parts.monitor
        self.watchdog = parts.watchdog
        self.config = to_dict(cfg)
        self.groups = group_names(self.engine.module, cfg.optim.weight_decay)
        self.shapes = trainable_shapes(self.engine.module)
        self.keys = KeyRecord(rank)
        done = self.ckpt.complete()
        self.last_checkpoint: Path | None = done[-1] if done else None
        self.signals = StopSignals()
        self.guard = StepGuard(device_skippable(self.engine))
        self.bad_in_row = 0
        self.step_lr = math.nan
        self.unsynced = [0.0, 0.0]  # samples read, undecodable samples: summed over ranks at log steps
        self.read_total = 0.0

    def run(self) -> int:
        s = self.state
        if s.step == 0 and s.micro_in_epoch == 0 and s.epoch == 0 and self.cfg.eval.at_start:
            self.monitor.evaluation(0, 0, self.evaluate(0))
        while s.epoch < self.cfg.train.epochs and s.step < self.plan.total:
            code = self.epoch()
            if code is not None:
                return code
        if self.last_checkpoint is None or self.last_checkpoint.name != s.tag():
            self.save()
        return 0

    def epoch(self) -> int | None:
        s = self.state
        watch = Stopwatch()
        data_time = 0.0
        losses: list[torch.Tensor] = []
        # closed however the epoch ends: the loader's workers must not outlive an error
        with contextlib.closing(self.data.epoch(s.epoch, s.micro_in_epoch)) as batches:
            for batch in self.watchdog.batches(batches, self.where):  # each batch and step in time
                data_time += watch.lap()
                if s.step == 0 and s.micro_in_epoch == 0:  # what the model sees, once
                    self.monitor.images(0, self.task.shown(batch))
                micro = self.micro_step(batch)
                s.micro_in_epoch += 1
                self.unsynced[0] += len(batch["keys"])
                self.unsynced[1] += int(batch["skipped"])
                if not micro.finite:
                    s.nonfinite_steps += 1
                    self.bad_in_row += 1
                    if self.bad_in_row >= self.cfg.train.max_nonfinite:
                        return self.diverged()
                else:
                    self.bad_in_row = 0
                    losses.append(micro.loss)
                    self.keys.write(s.epoch, batch["keys"])
                if not micro.boundary:
                    continue
                s.step += 1
                s.samples_seen += self.plan.global_batch
                if s.step % self.cfg.run.log_every == 0:
                    self.sync_counters()
                self.monitor.step(
                    StepStats(
                        step=s.step,
                        loss=torch.stack(losses).mean() if losses else None,
                        samples=self.plan.global_batch,
                        step_time=watch.lap() + data_time,
                        data_time=data_time,
                        lr=self.step_lr,
                        grad_norm=grad_norm(self.engine),
                        scalars=micro.scalars,
                        skipped=s.skipped_samples,
                        nonfinite=s.nonfinite_steps,
                    )
                )
                data_time, losses = 0.0, []
                if micro.stop:
                    return self.preempted()
                if s.micro_in_epoch == self.plan.micro_for(s.epoch):
                    break  # the epoch's last step: its checkpoint is the epoch-end one, below
                if self.ckpt.should_save(s, epoch_end=False):
                    self.save()
                if s.step >= self.plan.total:  # train.max_steps, mid-epoch
                    self.save()
                    return 0
        s.epoch, s.micro_in_epoch, s.legs = s.epoch + 1, 0, []
        self.sync_counters()
        if self.ckpt.should_save(s, epoch_end=True) or self.ckpt.should_save(s, epoch_end=False):
            self.save()
        if self.evaluator.should_eval(s.epoch, last=s.epoch == self.cfg.train.epochs):
            self.monitor.evaluation(s.step, s.epoch, self.evaluate(s.step))
        return None

    def micro_step(self, batch: Batch) -> MicroStep:
        """Forward; the ranks agree whether the loss is finite and whether a stop signal came
        (trainer/guard.py). Where the optimizer can skip on the device, backward and step are queued
        before the host reads that agreement, and a non-finite loss on any rank makes its window's
        update a no-op on the device (the step still counts, as DeepSpeed counts an overflow step in
        global_steps). Elsewhere the agreement is read first and a non-finite micro-batch is dropped
        before DeepSpeed sees it; the next micro-batch takes its place in the accumulation window."""
        s = self.state
        draw = derive_seed(self.cfg.run.seed, "step", s.epoch, s.micro_in_epoch, self.rank)
        loss, scalars = self.task.loss(self.engine, batch, draw)
        self.guard.agree(loss, self.signals.requested)
        if not self.guard.skips_on_device and not (verdict := self.guard.verdict()).finite:
            self.warn_nonfinite("dropped")
            return MicroStep(loss.detach(), False, False, verdict.stop, scalars)
        boundary = self.engine.is_gradient_accumulation_boundary()
        self.step_lr = float(self.engine.get_lr()[0])  # this update's rate (the scheduler steps after it)
        self.engine.backward(loss)
        self.engine.step()
        if boundary:
            self.guard.stepped()
            self.task.after_step(self.engine)
        verdict = self.guard.verdict()
        if not verdict.finite:
            self.warn_nonfinite("its optimizer step skipped")
        return MicroStep(loss.detach(), verdict.finite, boundary, verdict.stop, scalars)

    def warn_nonfinite(self, what: str) -> None:
        s = self.state
        log.warning(
            "non-finite loss at step %d (micro-batch %d of epoch %d): %s",
            s.step,
            s.micro_in_epoch,
            s.epoch,
            what,
        )

    def sync_counters(self) -> None:
        """Sum the undecodable-sample counts over ranks; too many stops the run."""
        read, skipped = all_sum(self.unsynced)
        self.unsynced = [0.0, 0.0]
        self.read_total += read
        self.state.skipped_samples += int(skipped)
        fraction = self.state.skipped_samples / max(self.read_total, 1.0)
        limit = self.cfg.data.max_bad_fraction
        if self.state.skipped_samples and fraction > limit and self.read_total >= 100:
            raise UserError(
                f"{self.state.skipped_samples} undecodable samples ({fraction:.1%} of those read) exceed "
                f"data.max_bad_fraction={limit}: check the shards of {self.cfg.data.manifest}"
            )

    def save(self) -> bool:
        with self.watchdog.phase("checkpoint", self.where):
            return self.checkpoint()

    def checkpoint(self) -> bool:
        """Checkpoint, unless the parameters went non-finite: a checkpoint is always one to go back to."""
        if not params_finite(self.engine, self.rank):
            log.error(
                "parameters are not finite at step %d: not checkpointed (newest good: %s)",
                self.state.step,
                self.last_checkpoint,
            )
            return False
        self.last_checkpoint = self.ckpt.save(
            self.engine, self.state, self.config, self.groups, self.task.extra_state(), self.shapes
        )
        return True

    def evaluate(self, step: int) -> Evaluation:
        with self.watchdog.phase("evaluation", self.where):
            return self.evaluator.run(self.engine, step)

    def where(self) -> str:
        """Where the loop stands, for a hang report."""
        s = self.state
        micro = f"micro-batch {s.micro_in_epoch + 1} of {self.plan.micro_for(s.epoch)}"
        return f"step {s.step + 1}, epoch {s.epoch + 1}, {micro}"

    def preempted(self) -> int:
        self.save()
        since = time.monotonic() - (self.signals.received_at or time.monotonic())
        log.info(
            "stop signal: checkpoint %s written %.1f s after the signal; exiting %d",
            self.last_checkpoint,
            since,
            EXIT_PREEMPTED,
        )
        return EXIT_PREEMPTED

    def diverged(self) -> int:
        """N non-finite losses in a row. They were skipped, so if the parameters are still finite they
        are those from before the divergence: checkpoint them. Either way, stop with a message."""
        saved = self.save()
        where = (
            f"checkpoint {self.last_checkpoint} holds the parameters from before the divergence"
            if saved
            else f"the newest good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint
            else "no checkpoint was written"
        )
        raise UserError(
            f"{self.bad_in_row} non-finite losses in a row at step {self.state.step} (train.max_nonfinite): {where}; "
            "lower optim.lr or check the data"
        )


class KeyRecord:
    """The keys of the samples this rank trained, when TRAINER_RECORD_KEYS names a folder (a test hook)."""

    def __init__(self, rank: int) -> None:
        folder = os.environ.get("TRAINER_RECORD_KEYS", "")
        self.path = Path(folder) / f"keys-rank{rank:05d}.tsv" if folder else None

    def write(self, epoch: int, keys: list[str]) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(f"{epoch}\t{key}\n" for key in keys))


class StopSignals:
    """SIGUSR1 (Slurm's warning before the time limit) and SIGTERM (preemption, torchrun's shutdown):
    finish the step, checkpoint, exit EXIT_PREEMPTED."""

    def __init__(self) -> None:
        self.requested = False
        self.received_at: float | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        if not self.requested:
            self.received_at = time.monotonic()
            log.info("received %s: checkpointing after this step", signal.Signals(signum).name)
        self.requested = True


def grad_norm(engine: Engine) -> float | torch.Tensor | None:
    """The step's global gradient norm, as DeepSpeed holds it (a device tensor is copied, not read)."""
    norm = engine.get_global_grad_norm()
    return norm.detach().clone() if isinstance(norm, torch.Tensor) else norm


def params_finite(engine: Engine, rank: int) -> bool:
    """Whether every rank's parameters (its partition under ZeRO-3) are finite, agreed across ranks."""
    flags = [
        torch.isfinite(data).all() for p in engine.module.parameters() if (data := own_part(p, rank)).numel()
    ]
    ok = float(torch.stack(flags).all()) if flags else 1.0  # one read of the device, not one per tensor
    return all_min([ok])[0] > 0


def own_part(p: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's elements of a parameter: the whole, or under ZeRO-3 its partition (`ds_tensor`)
    without the padding of the last partitions, which DeepSpeed allocates with torch.empty and never
    writes (runtime/zero/partition_parameters.py, `_partition_param`): read, it is whatever memory
    was there, and a NaN in it once failed a ZeRO-3 run's checkpoint as "parameters are not finite"."""
    part = getattr(p, "ds_tensor", None)
    if part is None:
        return p.data
    size = part.numel()
    return part.narrow(0, 0, max(0, min(size, int(p.ds_numel) - rank * size)))
