"""Tasks: what a model family brings to the one training harness (torchtitan's TrainSpec, in small).

A task builds its model, turns samples into batches, a batch into a loss, evaluates, and writes its
export (the protocol: trainer/tasks/base.py); the harness (plan, engine, loop, checkpoints, signals,
monitor, launchers) never learns which task runs. `train.objective` names the task; adding one is a
module here, a line in `task_class` and its name in trainer.config.OBJECTIVES.

This package imports the tasks only when asked for one: a task's config (tasks/clip/config.py,
tasks/diffusion/config.py) is a leaf that trainer.config imports without importing any task.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from core.manifest import Manifest
    from plumbing.dist import DistInfo
    from trainer.config import TrainConfig
    from trainer.run import RunFolder
    from trainer.tasks.base import Skeleton, Task


class TaskClass(Protocol):
    def __call__(self, cfg: TrainConfig, run: RunFolder, info: DistInfo, device: str) -> Task: ...

    @staticmethod
    def check(cfg: TrainConfig, manifest: Manifest) -> None:
        """What the data must offer this task, checked before anything heavy (a one-line UserError)."""
        ...

    @staticmethod
    def skeleton(cfg: TrainConfig, manifest: Manifest | None) -> Skeleton | None:
        """The task's model on the meta device for the memory plan, from the config alone (None when
        its shapes cannot be read offline: a hub id not cached here)."""
        ...


def task_class(objective: str) -> TaskClass:
    """The task of `train.objective` (one of trainer.config.OBJECTIVES)."""
    from trainer.tasks.clip.tasks import ClipClassification, ClipContrastive
    from trainer.tasks.diffusion.denoising import DenoisingTask
    from trainer.tasks.diffusion.vae import VaeTask

    tasks: dict[str, Any] = {
        "classification": ClipClassification,
        "contrastive": ClipContrastive,
        "vae": VaeTask,
        "denoising": DenoisingTask,
    }
    return tasks[objective]


def make_task(cfg: TrainConfig, run: RunFolder, info: DistInfo, device: str) -> Task:
    return task_class(cfg.train.objective)(cfg, run, info, device)
