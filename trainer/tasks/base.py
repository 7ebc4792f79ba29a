"""What every task is to the harness: the Task protocol, its Batch and its Evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from trainer.engine import Engine

Batch = dict[str, Any]


@dataclass
class Evaluation:
    """Metrics (every rank gets the same), and pictures for TensorBoard (rank 0 writes them)."""

    metrics: dict[str, float]
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # tag → NCHW in [0, 1]


@dataclass
class Skeleton:
    """A task's model on the meta device (exact shapes, no memory) for the memory plan made before a
    run (trainer/memory/): what DeepSpeed would wrap, frozen where the run freezes it, and how one
    training forward of it is called at a micro-batch, in a precision."""

    module: torch.nn.Module
    forward: Callable[[torch.nn.Module, int, torch.dtype], Any]
    beside: torch.nn.Module | None = None  # what the task holds beside the engine (a frozen VAE)
    beside_forward: Callable[[torch.nn.Module, int, torch.dtype], Any] | None = None  # per step, no grad
    ema: int = 0  # parameters the task keeps an fp32 moving average of


class Task(Protocol):
    """One model family's part of a run. Built on every rank, after the process group exists."""

    prep: Callable[[dict[str, Any], int, bool], dict[str, Any]]
    """A decoded sample, its seed and train/eval → what `collate` takes (runs in loader workers)."""
    collate: Callable[[list[dict[str, Any]]], Batch]
    """Samples → a batch (runs in loader workers)."""

    def build(self) -> torch.nn.Module:
        """The module DeepSpeed wraps, with what must not train already frozen."""
        ...

    def loss(self, engine: Engine, batch: Batch, draw: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch's loss, and scalars to log (left on the device; read at log steps). `draw` seeds
        any randomness, so that a resumed run draws exactly what an uninterrupted one would."""
        ...

    def after_step(self, engine: Engine) -> None:
        """After each optimizer step (an EMA update, say)."""
        ...

    def evaluate(self, engine: Engine, batches: Iterable[Batch], step: int) -> Evaluation: ...

    def shown(self, batch: Batch) -> torch.Tensor:
        """The batch's images as the model sees them, in [0, 1], for TensorBoard."""
        ...

    def extra_state(self) -> dict[str, torch.Tensor]:
        """This rank's state beyond the engine's, for its checkpoint (an EMA, say)."""
        ...

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def export(
        self, weights: Mapping[str, torch.Tensor], extra: list[dict[str, torch.Tensor]], out: Path
    ) -> None:
        """Write the export folder from the consolidated fp32 weights (and every rank's extra state):
        a mapping that makes each tensor as it is read (trainer.engine.Weights): load them with
        trainer.engine.load_weights, one at a time."""
        ...

    def exported(self, out: Path) -> dict[str, torch.Tensor]:
        """The export read back, under the engine module's parameter names (checked after export)."""
        ...

    def expected_export(self, name: str, live: torch.Tensor) -> torch.Tensor | None:
        """What `exported` must hold under `name`, given the live engine's gathered fp32 parameter
        (None: not checked). Asked one parameter at a time, on rank 0, before the engine is freed."""
        ...

    def release(self) -> None:
        """Drop what refers to the trained engine (an EMA's parameters): the engine is then freed
        before the export is written."""
        ...

    def hyperparameters(self) -> dict[str, Any]: ...
