"""The run folder: where everything a training run writes lives."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    root: Path

    config = property(lambda self: self.root / "config.yaml")
    log = property(lambda self: self.root / "train.log")
    tensorboard = property(lambda self: self.root / "tensorboard")
    checkpoints = property(lambda self: self.root / "checkpoints")
    export = property(lambda self: self.root / "export")
    attempts = property(
        lambda self: self.root / "attempts"
    )  # what each try of a launch did (trainer.attempts)
    base_model = property(lambda self: self.root / "base-model")  # a preset's model, built here once
