"""`python -m trainer --check`: everything a run needs, checked in one process before a launcher
starts many (so that a bad config or an unusable shard layout is one line, not N tracebacks)."""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import load_manifest, verify_shards
from plumbing.errors import UserError
from trainer.config import TrainConfig
from trainer.data import train_layout


def check(cfg: TrainConfig, world_size: int) -> str:
    manifest = load_manifest(Path(cfg.data.manifest))
    for split in (cfg.data.train_split, cfg.data.eval_split):
        if cfg.data.verify != "none":
            verify_shards(manifest, split, checksum=False)  # sizes now; the run itself checks sha256
    train = manifest.split(cfg.data.train_split)
    layout = train_layout(
        train.num_samples,
        world_size,
        cfg.data.workers,
        cfg.train.batch_size,
        cfg.data.train_split,
        manifest.root / "manifest.json",
    )
    steps = layout.micro_batches // cfg.train.grad_accum
    if steps == 0:
        raise UserError(
            f"an epoch gives each rank {layout.micro_batches} micro-batches, fewer than train.grad_accum={cfg.train.grad_accum}"
        )
    if cfg.train.objective == "classification" and not manifest.classes:
        raise UserError(
            f"{manifest.root / 'manifest.json'}: train.objective=classification needs class names (a cifar10 manifest)"
        )
    if (
        cfg.model.preset != "tiny"
        and Path(cfg.model.name).is_absolute()
        and not Path(cfg.model.name).is_dir()
    ):
        raise UserError(f"model.name={cfg.model.name}: no such folder")
    total = steps * cfg.train.epochs
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
    return (
        f"ok: {train.num_samples} {cfg.data.train_split} samples; {world_size} ranks × {layout.workers} loader workers × "
        f"batch {cfg.train.batch_size} × accum {cfg.train.grad_accum} → {steps} steps/epoch, {total} steps in all"
    )
