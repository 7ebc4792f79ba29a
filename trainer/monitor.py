"""What a user watches: TensorBoard scalars (rank 0 writes), a rank-0 progress bar, log lines.

Tags: train/{loss,lr,grad_norm,temperature}, perf/{samples_per_s,step_time_s,data_wait_fraction,
peak_memory_mb}, data/{skipped_samples,nonfinite_steps}, eval/<metric>, and the hparams table.
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

log = logging.getLogger("trainer")


def peak_memory_mb(device: str) -> float:
    """Peak CUDA memory allocated, or the process's peak resident set on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Window:
    """Sums over the steps since the last log line."""

    steps: int = 0
    loss: float = 0.0
    step_time: float = 0.0
    data_time: float = 0.0
    samples: int = 0
    grad_norm: list[float] = field(default_factory=list)


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

    def step(
        self,
        step: int,
        loss: float,
        samples: int,
        step_time: float,
        data_time: float,
        lr: float,
        grad_norm: float | None,
        temperature: float,
        skipped: int,
        nonfinite: int,
    ) -> None:
        w = self.window
        w.steps += 1
        w.loss += loss
        w.step_time += step_time
        w.data_time += data_time
        w.samples += samples
        if grad_norm is not None:
            w.grad_norm.append(grad_norm)
        self.bar.update(1)
        if step % self.log_every:
            return
        rate = w.samples / max(w.step_time, 1e-9)
        values = {
            "train/loss": w.loss / w.steps,
            "train/lr": lr,
            "train/temperature": temperature,
            "perf/samples_per_s": rate,
            "perf/step_time_s": w.step_time / w.steps,
            "perf/data_wait_fraction": w.data_time / max(w.step_time, 1e-9),
            "perf/peak_memory_mb": peak_memory_mb(self.device),
            "data/skipped_samples": skipped,
            "data/nonfinite_steps": nonfinite,
        }
        if w.grad_norm:
            values["train/grad_norm"] = sum(w.grad_norm) / len(w.grad_norm)
        self.scalars(step, values)
        self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", samples_s=f"{rate:.0f}", refresh=False)
        if self.enabled:
            log.info(
                "step %d loss %.4f lr %.2e %.0f samples/s data-wait %.0f%%",
                step,
                values["train/loss"],
                lr,
                rate,
                100 * values["perf/data_wait_fraction"],
            )
        self.window = Window()

    def images(
        self,
        step: int,
        batch: torch.Tensor,
        mean: list[float],
        std: list[float],
        tag: str = "data/train_images",
    ) -> None:
        """A grid of (up to 16) model inputs, un-normalised: what the model sees after preprocessing."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        shown = batch[:16].float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(
            1, 3, 1, 1
        )
        self.writer.add_image(tag, make_grid(shown.clamp(0, 1), nrow=4), step)

    def evaluation(self, step: int, epoch: int, metrics: dict[str, float]) -> None:
        """TensorBoard, the log, and one JSON line in <run>/eval.jsonl (python -m trainer.report)."""
        self.scalars(step, {f"eval/{k}": v for k, v in metrics.items()})
        self.last_eval = metrics
        if self.enabled:
            with open(self.eval_log, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, **metrics}) + "\n")
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("samples", "images"))
        if self.enabled:
            self.bar.write(
                f"eval after epoch {epoch} (step {step}): {shown}"
            ) if not self.bar.disable else log.info("eval after epoch %d (step %d): %s", epoch, step, shown)

    def hparams(self, params: dict[str, Any]) -> None:
        """TensorBoard's HParams table: the run's main settings against its last evaluation."""
        if self.writer is not None:
            flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in params.items()}
            self.writer.add_hparams(flat, {f"hparam/{k}": v for k, v in self.last_eval.items()}, run_name=".")

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


class Stopwatch:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        elapsed, self.t = now - self.t, now
        return elapsed
