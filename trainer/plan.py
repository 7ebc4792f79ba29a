"""The run plan: from the config, the manifest and the world size, everything a run's length depends
on — the epoch layout, steps per epoch, the total, the LR horizon — and every reason it cannot run
("not enough samples", "fewer micro-batches than grad_accum", what the task needs from the data).
The trainer, `python -m trainer --check` and the launchers' dry runs all ask this one function.

Given the checkpoint a run resumes, the plan also says how it continues under this run's layout: the
global batch is kept when the new number of ranks divides it (by train.grad_accum, unless the batch or
grad_accum were changed on purpose), an epoch interrupted under another layout is finished by reading
its untrained samples as a leg of their own (trainer/data.py), and the LR schedule ends where the
training now ends; `note` says what changed, before step 1.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from core.manifest import MANIFEST, Manifest, load_manifest, verify_shards
from plumbing.errors import UserError
from trainer.checkpoint import Saved, TrainState
from trainer.config import TrainConfig
from trainer.data import Layout, Leg, Rest, untrained
from trainer.engine import BatchSizes
from trainer.memory.check import memory_verdict, unplanned
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
    shuffle: int = 0  # data.shuffle_buffer (recorded in a fresh run's state)
    rest: Rest | None = None  # a resumed epoch's untrained samples, read under this run's layout
    start: TrainState | None = None  # where a resumed run starts (None: from scratch)
    note: str = ""  # what a resume under another layout changes (logged before step 1)

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def micro_for(self, epoch: int) -> int:
        """Micro-batches per rank that `epoch` trains (fewer for the rest of an interrupted one)."""
        if self.rest is not None and self.rest.epoch == epoch:
            return self.rest.micro
        return self.micro_per_epoch

    def state(self) -> TrainState:
        """The state the run starts from: the resumed checkpoint's, or a fresh one."""
        if self.start is not None:
            return self.start
        return TrainState.of(self.layout, self.shuffle, self.accum, self.horizon)

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


def plan(cfg: TrainConfig, manifest: Manifest, world: int, saved: Saved | None = None) -> Plan:
    """The plan of a run on `world` ranks; `saved`: the checkpoint it resumes."""
    d, t = cfg.data, cfg.train
    train = manifest.split(d.train_split)
    manifest.split(d.eval_split)  # a missing eval split is an error now, not after an epoch
    task_class(t.objective).check(cfg, manifest)
    layout = train_layout(
        train.num_samples, world, d.workers, t.batch_size, d.train_split, manifest.root / MANIFEST
    )
    accum = kept_accum(t.batch_size, t.grad_accum, world, saved)
    steps = layout.micro_batches // accum
    if steps == 0:
        raise UserError(
            f"an epoch gives each rank {layout.micro_batches} micro-batches, fewer than train.grad_accum={accum}: "
            "lower grad_accum or the batch size"
        )
    horizon = steps * t.epochs
    if saved is None:
        total = limited(horizon, t.max_steps)
        return Plan(layout, accum, t.epochs, steps, horizon, total, train.num_samples, d.shuffle_buffer)
    was = saved.state
    leg = Leg(world, layout.workers, t.batch_size, d.shuffle_buffer)
    start = was.continued(leg, accum)
    rest = None
    if start.legs and start.epoch < t.epochs:
        rest = rest_of_epoch(start, train.num_samples, leg, accum, cfg.run.seed)
    changed = not was.trained_under(leg, accum)
    if changed:  # the schedule ends where training now ends
        horizon = start.step + steps_left(start, t.epochs, steps, accum, rest)
    else:  # the schedule it was trained with (a checkpoint that did not record it: the whole run's)
        horizon = was.horizon or horizon
    start.horizon = horizon
    total = limited(horizon, t.max_steps)
    made = Plan(
        layout, accum, t.epochs, steps, horizon, total, train.num_samples, d.shuffle_buffer, rest, start
    )
    asked = (t.batch_size, t.grad_accum)
    return replace(made, note=change_note(saved, made, asked)) if changed else made


def kept_accum(batch: int, accum: int, world: int, saved: Saved | None) -> int:
    """train.grad_accum; or, resuming with the batch size and grad_accum the checkpoint's run was
    configured with, the grad_accum that keeps the global batch it trained with, when this run's ranks
    × batch divide it (2 ranks × accum 1 → 1 rank × accum 2, and on 1 rank again still 2; not 1 → 2
    ranks: that global batch doubles). Set either on purpose and it is yours."""
    if saved is None or (batch, accum) != (
        saved.setting("train", "batch_size"),
        saved.setting("train", "grad_accum"),
    ):
        return accum
    s = saved.state
    kept = s.micro_batch * s.grad_accum * s.world_size
    return kept // (batch * world) if kept % (batch * world) == 0 else accum


def limited(horizon: int, max_steps: int) -> int:
    return min(horizon, max_steps) if max_steps else horizon


def rest_of_epoch(start: TrainState, samples: int, leg: Leg, accum: int, seed: int) -> Rest:
    """The interrupted epoch's untrained samples cut over this run's ranks × workers, in whole
    optimizer steps (the remainder is left out, as at the end of every epoch)."""
    pool = untrained(samples, start.legs, seed, start.epoch)
    layout = Layout.over(len(pool), leg.ranks, leg.workers, leg.batch)
    micro = layout.micro_batches // accum * accum
    return Rest(start.epoch, tuple(start.legs), layout, micro, pool)


def steps_left(start: TrainState, epochs: int, steps: int, accum: int, rest: Rest | None) -> int:
    """Optimizer steps from `start` to the end of the last epoch."""
    if start.epoch >= epochs:
        return 0
    this_epoch = (rest.micro if rest is not None else steps * accum) - start.micro_in_epoch
    return this_epoch // accum + (epochs - start.epoch - 1) * steps


def change_note(saved: Saved, made: Plan, asked: tuple[int, int]) -> str:
    """What a resume under another layout changes, in words: the global batch, the interrupted epoch's
    rest, steps per epoch, the LR horizon. `asked`: this run's train.batch_size and grad_accum."""
    was, lay, accum = saved.state, made.layout, made.accum
    old_global = was.micro_batch * was.grad_accum * was.world_size
    parts = [
        f"trained by {was.world_size} ranks × {was.loader_workers} loader workers × batch {was.micro_batch} × "
        f"accum {was.grad_accum}, continued by {lay.ranks} × {lay.workers} × {lay.batch} × {accum}"
    ]
    if made.global_batch == old_global:
        kept = f" (grad_accum {was.grad_accum} → {accum})" if accum != was.grad_accum else ""
        parts.append(f"global batch kept at {old_global}{kept}")
    elif asked == (saved.setting("train", "batch_size"), saved.setting("train", "grad_accum")):
        parts.append(
            f"global batch {old_global} → {made.global_batch} ({old_global} is not a multiple of "
            f"{lay.ranks} ranks × batch {lay.batch})"
        )
    else:
        parts.append(f"global batch {old_global} → {made.global_batch} (train.batch_size or grad_accum set)")
    if made.rest is not None:
        r = made.rest
        left_out = len(r.pool) - r.micro * lay.ranks * lay.batch
        parts.append(
            f"{len(r.pool)} samples of epoch {r.epoch} not yet trained: {r.micro // accum} steps"
            + (f", {left_out} left out (whole steps only, as at every epoch's end)" if left_out else "")
        )
    old = Layout.over(made.samples, was.world_size, was.loader_workers, was.micro_batch)
    parts.append(f"steps per epoch {old.micro_batches // was.grad_accum} → {made.steps_per_epoch}")
    parts.append(f"LR horizon {was.horizon or '?'} → {made.horizon} steps")
    return "; ".join(parts)


def check(cfg: TrainConfig, world: int, dry_run: bool = False, per_node: int = 0) -> tuple[str, str]:
    """`python -m trainer --check`: the plan, the shards' sizes (the run itself checks their sha256),
    the model folder, and the memory plan of `world` ranks, `per_node` of them on each node (0: all on
    one). With `dry_run` a manifest that does not exist yet is reported, not an error, and so is a
    memory plan that does not fit this machine (the launchers' DRY_RUN may run where the job will not).
    Returns what to print and, when the memory plan does not fit (and run.check_memory), its one-line
    refusal."""
    path = Path(cfg.data.manifest)
    manifest = None
    if dry_run and not (path / MANIFEST if path.is_dir() else path).is_file():
        head = f"ok: config valid; data not checked ({path} does not exist yet)"
    else:
        manifest = load_manifest(path)
        if cfg.data.verify != "none":
            for split in (cfg.data.train_split, cfg.data.eval_split):
                verify_shards(manifest, split, checksum=False)
        if not cfg.model.preset and Path(cfg.model.name).is_absolute() and not Path(cfg.model.name).is_dir():
            raise UserError(f"model.name={cfg.model.name}: no such folder")
        head = "ok: " + plan(cfg, manifest, world).describe(cfg.data.train_split)
    verdict = memory_verdict(cfg, world, per_node or world, manifest)
    if verdict is None:
        return f"{head}\nmemory plan: not made ({unplanned(cfg)})", ""
    refusal = verdict.refusal if cfg.run.check_memory else ""
    if dry_run and refusal:  # made where the job is submitted, which may not be where it runs
        return "\n".join([head, *verdict.lines, f"would refuse here: {refusal}"]), ""
    return "\n".join([head, *verdict.lines]), refusal
