"""The run plan: from the config, the manifest and the world size, everything a run's length depends
on — the epoch layout, steps per epoch, the total, the LR horizon — and every reason it cannot run
("not enough samples", "fewer micro-batches than grad_accum", what the task needs from the data).
The trainer, `python -m trainer --check` and the launchers' dry runs all ask this one function.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.manifest import MANIFEST, Manifest, load_manifest, verify_shards
from plumbing.errors import UserError
from trainer.config import TrainConfig
from trainer.data import Layout
from trainer.engine import BatchSizes
from trainer.tasks import task_class


@dataclass(frozen=True)
class Plan:
    layout: Layout
    accum: int
    epochs: int
    steps_per_epoch: int
    horizon: int  # the LR schedule's length: every epoch's steps (train.max_steps only stops early)
    total: int  # optimizer steps this run trains
    samples: int  # in the train split

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    @property
    def sizes(self) -> BatchSizes:
        return BatchSizes(self.layout.batch, self.accum, self.layout.ranks)

    @property
    def global_batch(self) -> int:
        return self.sizes.global_batch

    def describe(self, split: str) -> str:
        lay = self.layout
        return (
            f"{self.samples} {split} samples; {lay.ranks} ranks × {lay.workers} loader workers × batch {lay.batch} × "
            f"accum {self.accum} → {self.steps_per_epoch} steps/epoch, {self.total} steps in all"
        )


def train_layout(total: int, ranks: int, workers: int, batch: int, split: str, manifest: Path) -> Layout:
    slots = ranks * max(1, workers)
    layout = Layout(ranks, max(1, workers), batch, total // slots)
    if layout.batches_per_slot == 0:
        raise UserError(
            f"{manifest}: split {split!r} has {total} samples, but {ranks} ranks × {max(1, workers)} loader workers × "
            f"batch {batch} need at least {slots * batch}; lower train.batch_size or data.workers, or add data"
        )
    return layout


def plan(cfg: TrainConfig, manifest: Manifest, world: int) -> Plan:
    d, t = cfg.data, cfg.train
    train = manifest.split(d.train_split)
    manifest.split(d.eval_split)  # a missing eval split is an error now, not after an epoch
    task_class(t.objective).check(cfg, manifest)
    layout = train_layout(
        train.num_samples, world, d.workers, t.batch_size, d.train_split, manifest.root / MANIFEST
    )
    steps = layout.micro_batches // t.grad_accum
    if steps == 0:
        raise UserError(
            f"an epoch gives each rank {layout.micro_batches} micro-batches, fewer than train.grad_accum={t.grad_accum}: "
            "lower grad_accum or the batch size"
        )
    horizon = steps * t.epochs
    total = min(horizon, t.max_steps) if t.max_steps else horizon
    return Plan(layout, t.grad_accum, t.epochs, steps, horizon, total, train.num_samples)


def check(cfg: TrainConfig, world: int, dry_run: bool = False) -> str:
    """`python -m trainer --check`: the plan, the shards' sizes (the run itself checks their sha256)
    and the model folder. With `dry_run` a manifest that does not exist yet is reported, not an error."""
    path = Path(cfg.data.manifest)
    if dry_run and not (path / MANIFEST if path.is_dir() else path).is_file():
        return f"ok: config valid; data not checked ({path} does not exist yet)"
    manifest = load_manifest(path)
    if cfg.data.verify != "none":
        for split in (cfg.data.train_split, cfg.data.eval_split):
            verify_shards(manifest, split, checksum=False)
    if not cfg.model.preset and Path(cfg.model.name).is_absolute() and not Path(cfg.model.name).is_dir():
        raise UserError(f"model.name={cfg.model.name}: no such folder")
    return "ok: " + plan(cfg, manifest, world).describe(cfg.data.train_split)
