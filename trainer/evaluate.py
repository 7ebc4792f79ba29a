"""When and how a run evaluates: at the start (the baseline the demo's before/after table shows) and
after every N epochs, the task's own evaluation on the eval split, the engine in eval mode."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from plumbing.config import require
from trainer.engine import Engine
from trainer.tasks.base import Evaluation, Task


@dataclass
class EvalConfig:
    at_start: bool = True
    """Evaluate before the first step (the baseline the demo's before/after table shows)."""
    every_epochs: int = 1
    """Evaluate after every N epochs (0: never; the last epoch is always evaluated when N > 0)."""
    batch_size: int = 64
    """Eval batch per rank."""
    recall_at: list[int] = field(default_factory=lambda: [1, 5, 10])
    """k of the retrieval Recall@k metrics."""

    def __post_init__(self) -> None:
        require(self.every_epochs >= 0, self, "every_epochs", "an int >= 0")
        require(self.batch_size >= 1, self, "batch_size", "an int >= 1")
        require(all(k >= 1 for k in self.recall_at), self, "recall_at", "ks >= 1")


class Evaluator:
    def __init__(self, cfg: EvalConfig, task: Task, batches: Callable[[], Iterable[dict[str, Any]]]) -> None:
        self.cfg, self.task, self.batches = cfg, task, batches  # a fresh loader per evaluation

    def should_eval(self, epoch_done: int, last: bool) -> bool:
        if self.cfg.every_epochs == 0:
            return False
        return last or epoch_done % self.cfg.every_epochs == 0

    @torch.no_grad()
    def run(self, engine: Engine, step: int) -> Evaluation:
        was_training = engine.training
        engine.eval()
        batches = self.batches()
        try:
            return self.task.evaluate(engine, batches, step)
        finally:
            engine.train(was_training)
            getattr(batches, "close", lambda: None)()  # the loader's workers end with the evaluation
