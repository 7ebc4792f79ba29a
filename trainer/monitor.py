"""What a user watches: TensorBoard scalars (rank 0 writes), a rank-0 progress bar, log lines.

Tags: train/{loss,lr,grad_norm} and the task's own (train/temperature), perf/{samples_per_s,
step_time_s,data_wait_fraction,peak_memory_mb}, data/{skipped_samples,nonfinite_steps}, eval/<metric>,
the task's evaluation images, and the hparams table. Values that live on the device (the loss, the
task's scalars) stay there until a log step reads them: reading one is a stream synchronisation.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from plumbing.logs import progress
from trainer.tasks.base import Evaluation

log = logging.getLogger("trainer")


def peak_memory_mb(device: str) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


Scalar = float | torch.Tensor


@dataclass
class StepStats:
    """One optimizer step, as the loop saw it."""

    step: int
    loss: Scalar | None  # the mean of the step's finite micro-batch losses (detached); None: none was
    samples: int  # over all ranks
    step_time: float
    data_time: float  # of step_time, spent waiting for the loader
    lr: float
    grad_norm: Scalar | None
    scalars: dict[str, Scalar] = field(default_factory=dict)  # the task's, e.g. train/temperature
    skipped: int = 0
    nonfinite: int = 0


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: Scalar = 0.0
    losses: int = 0  # steps with a finite loss
    step_time: float = 0.0
    data_time: float = 0.0
    samples: int = 0
    grad_norm: list[Scalar] = field(default_factory=list)


class Monitor:
    def __init__(
        self, run_dir: Path, enabled: bool, device: str, log_every: int, total_steps: int, start_step: int
    ) -> None:
        self.enabled, self.device, self.log_every = enabled, device, log_every
        self.eval_log = run_dir / "eval.jsonl"
        tb_dir = run_dir / "tensorboard"
        self.writer: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops what its predecessor logged after the checkpoint
            self.writer = SummaryWriter(str(tb_dir), purge_step=start_step + 1 if start_step else None)
        self.bar = progress(total_steps, "train", "step", enabled=enabled, initial=start_step)
        self.window = Window()
        self.last_eval: dict[str, float] = {}

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, step)

    def step(self, stats: StepStats) -> None:
        w = self.window
        w.steps += 1
        if stats.loss is not None:
            w.loss = w.loss + stats.loss  # on the device until the log step
            w.losses += 1
        w.step_time += stats.step_time
        w.data_time += stats.data_time
        w.samples += stats.samples
        if stats.grad_norm is not None:
            w.grad_norm.append(stats.grad_norm)
        self.bar.update(1)
        if stats.step % self.log_every:
            return
        read = on_host([w.loss, *w.grad_norm, *stats.scalars.values()])
        loss, norms, scalars = read[0], read[1 : 1 + len(w.grad_norm)], read[1 + len(w.grad_norm) :]
        rate = w.samples / max(w.step_time, 1e-9)
        values = {
            "train/loss": loss / w.losses if w.losses else math.nan,
            "train/lr": stats.lr,
            **dict(zip(stats.scalars, scalars, strict=True)),
            "perf/samples_per_s": rate,
            "perf/step_time_s": w.step_time / w.steps,
            "perf/data_wait_fraction": w.data_time / max(w.step_time, 1e-9),
            "perf/peak_memory_mb": peak_memory_mb(self.device),
            "data/skipped_samples": stats.skipped,
            "data/nonfinite_steps": stats.nonfinite,
        }
        if norms:
            values["train/grad_norm"] = sum(norms) / len(norms)
        self.scalars(stats.step, values)
        self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", samples_s=f"{rate:.0f}", refresh=False)
        if self.enabled:
            log.info(
                "step %d loss %.4f lr %.2e %.0f samples/s data-wait %.0f%%",
                stats.step,
                values["train/loss"],
                stats.lr,
                rate,
                100 * values["perf/data_wait_fraction"],
            )
        self.window = Window()

    def images(self, step: int, pictures: torch.Tensor, tag: str = "data/train_images") -> None:
        """A grid of (up to 16) NCHW pictures in [0, 1]: what the model sees, or what it drew."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        self.writer.add_image(tag, make_grid(pictures[:16].float().cpu().clamp(0, 1), nrow=4), step)

    def evaluation(self, step: int, epoch: int, result: Evaluation) -> None:
        """TensorBoard, the log, and one JSON line in <run>/eval.jsonl (python -m trainer.report)."""
        metrics = result.metrics
        self.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        for tag, pictures in result.images.items():
            self.images(step, pictures, tag)
        self.last_eval = metrics
        if self.enabled:
            with open(self.eval_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("samples", "images"))
        if self.enabled:
            line = f"eval after epoch {epoch} (step {step}): {shown}"
            self.bar.write(line) if not self.bar.disable else log.info(line)

    def hparams(self, params: dict[str, Any]) -> None:
        """TensorBoard's HParams table: the run's main settings against its last evaluation."""
        if self.writer is not None:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in self.last_eval.items()}, run_name=".")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def on_host(values: list[Scalar]) -> list[float]:
    """Floats of scalars, those on a device read in one copy: one synchronisation per log step."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors:
        return [float(v) for v in values]
    read = iter(torch.stack([t.detach().float().reshape(()).to(tensors[0].device) for t in tensors]).tolist())
    return [next(read) if isinstance(v, torch.Tensor) else float(v) for v in values]


class Stopwatch:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.t = now - self.t, now
        return elapsed
