"""Checkpoints: DeepSpeed's engine state plus the trainer's own state, written so that a crash during a
save never breaks the newest usable checkpoint.

A save goes to `checkpoints/.partial-<tag>/`; when every rank has written its part, rank 0 adds
`trainer_state.json` (the marker of a complete checkpoint) and renames the folder to `<tag>`.
`resume: auto` takes the newest folder with that marker; partial folders are removed at the next save.

A checkpoint resumed on another number of ranks under ZeRO 1-3 is first converted, once, by DeepSpeed's
own Universal Checkpointing (`deepspeed.checkpoint.ds_to_universal`: every parameter's fp32 weights and
Adam moments whole, re-partitioned at load time) into the sibling folder `<tag>.universal/`, written
under a `.partial-` name and renamed when whole; the checkpoint itself is never touched. ZeRO-0 needs no
conversion: its optimizer state is whole in `mp_rank_00_model_states.pt`, which every rank loads.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from plumbing.config import require
from plumbing.dist import DistInfo, barrier, broadcast_object
from plumbing.errors import UserError
from plumbing.files import atomic_write_json, fsync_dir, is_write_error, read_json, write_failed
from trainer import engine as ds
from trainer.data import Layout, Leg
from trainer.engine import Engine

log = logging.getLogger("trainer.checkpoint")
STATE = "trainer_state.json"
PARTIAL = ".partial-"
UNIVERSAL = ".universal"  # suffix of the sibling folder a checkpoint is converted into
SOURCE = "source-" + STATE  # the converted checkpoint's marker, copied into its universal folder


@dataclass
class CheckpointConfig:
    every_steps: int = 0
    """Also checkpoint every N optimizer steps (0: only at the end of each epoch)."""
    at_epoch_end: bool = True
    """Checkpoint at the end of every epoch."""
    keep_last: int = 3
    """Keep this many newest checkpoints; older ones are deleted after a newer one is complete."""

    def __post_init__(self) -> None:
        require(self.every_steps >= 0, self, "every_steps", "an int >= 0")
        require(self.keep_last >= 1, self, "keep_last", "an int >= 1")


@dataclass
class TrainState:
    """Where training stands; everything a resumed run needs besides DeepSpeed's own state."""

    epoch: int = 0
    step: int = 0  # optimizer steps done
    micro_in_epoch: int = 0  # micro-batches of `epoch` already trained (the data position)
    samples_seen: int = 0
    skipped_samples: int = 0
    nonfinite_steps: int = 0
    world_size: int = 1
    loader_workers: int = 1
    micro_batch: int = 1
    shuffle_buffer: int = 0  # 0: not recorded (checkpoints from before it was): the config's
    grad_accum: int = 0  # 0: not recorded: the config's
    horizon: int = 0  # the LR schedule's length this run trains with (0: not recorded)
    legs: list[Leg] = field(default_factory=list)  # earlier legs of `epoch` (read under other layouts)

    @classmethod
    def of(cls, layout: Layout, shuffle: int = 0, accum: int = 1, horizon: int = 0) -> TrainState:
        """A fresh run's state; the data layout is recorded so that a resume can check it."""
        return cls(
            world_size=layout.ranks,
            loader_workers=layout.workers,
            micro_batch=layout.batch,
            shuffle_buffer=shuffle,
            grad_accum=accum,
            horizon=horizon,
        )

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> TrainState:
        """The state of a trainer_state.json; what older checkpoints did not record comes from their config."""
        fields = dict(payload["state"])
        config = payload.get("config", {})
        legs = [Leg(**leg) for leg in fields.pop("legs", [])]
        state = cls(**fields, legs=legs)
        if not state.shuffle_buffer:
            state.shuffle_buffer = int(config.get("data", {}).get("shuffle_buffer", 0))
        if not state.grad_accum:
            state.grad_accum = int(config.get("train", {}).get("grad_accum", 1))
        return state

    def tag(self) -> str:
        return f"step-{self.step:08d}"

    def leg(self) -> Leg:
        """The layout this state was trained under, and how far into its leg of the epoch."""
        return Leg(
            self.world_size, self.loader_workers, self.micro_batch, self.shuffle_buffer, self.micro_in_epoch
        )

    def trained_under(self, leg: Leg, accum: int) -> bool:
        """Whether this state was trained under `leg`'s data layout and `accum`."""
        return self.leg().same_layout(leg) and self.grad_accum == accum

    def continued(self, leg: Leg, accum: int) -> TrainState:
        """The state a run under `leg`'s layout and `accum` continues from: this one when nothing changed;
        else the interrupted epoch's progress becomes a finished leg, and the rest of it a new one."""
        here = self.leg()
        if self.trained_under(leg, accum):
            return replace(self, legs=list(self.legs))
        legs = [*self.legs, here] if self.micro_in_epoch else list(self.legs)
        return replace(
            self,
            legs=legs,
            micro_in_epoch=0,
            world_size=leg.ranks,
            loader_workers=max(1, leg.workers),
            micro_batch=leg.batch,
            shuffle_buffer=leg.shuffle,
            grad_accum=accum,
        )


@dataclass(frozen=True)
class Saved:
    """A complete checkpoint, as read before anything heavy is built: where training stood, and what
    it was trained with (the resolved config, the optimizer groups' parameter names and shapes)."""

    path: Path
    state: TrainState
    config: dict[str, Any]
    groups: list[list[str]]
    shapes: dict[str, list[int]]  # empty in checkpoints from before they were recorded

    @classmethod
    def read(cls, path: Path) -> Saved:
        payload = read_json(path / STATE)
        shapes = payload.get("param_shapes", {})
        return cls(path, TrainState.from_payload(payload), payload["config"], payload["param_groups"], shapes)

    def setting(self, section: str, key: str) -> Any:
        return self.config.get(section, {}).get(key)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


class Checkpointer:
    def __init__(self, cfg: CheckpointConfig, root: Path, info: DistInfo) -> None:
        self.cfg, self.root, self.info = cfg, root, info
        self.saved: set[str] = set()

    def should_save(self, state: TrainState, epoch_end: bool) -> bool:
        if epoch_end:
            return self.cfg.at_epoch_end
        return self.cfg.every_steps > 0 and state.step % self.cfg.every_steps == 0

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [
            p
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / STATE).is_file()
        ]
        return sorted(found, key=lambda p: read_json(p / STATE)["state"]["step"])

    def save(
        self,
        engine: Engine,
        state: TrainState,
        config: dict[str, Any],
        groups: list[list[str]],
        extra: dict[str, torch.Tensor],
        shapes: dict[str, list[int]] | None = None,
    ) -> Path:
        """Every rank writes its part (DeepSpeed's files, its RNG state, the task's `extra` state);
        rank 0 then marks the checkpoint complete and renames it into place."""
        final = self.root / state.tag()
        if state.tag() in self.saved:  # the same step saved already (e.g. epoch end and every_steps agree)
            return final
        tag = PARTIAL + state.tag()
        if self.info.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(PARTIAL + "*"):
                shutil.rmtree(stale, ignore_errors=True)
        barrier()
        payload = {
            "state": asdict(state),
            "config": config,
            "param_groups": groups,
            "param_shapes": shapes or {},
        }
        try:
            ds.save_checkpoint(engine, self.root, tag, {"trainer": payload})
            torch.save(_rng_state(), self.root / tag / f"rng-rank{self.info.rank:05d}.pt")
            if extra:
                save_file(
                    {k: v.contiguous() for k, v in extra.items()},
                    str(self.root / tag / extra_name(self.info.rank)),
                )
        except (OSError, RuntimeError) as err:  # a full disk; the complete checkpoints are untouched
            if not is_write_error(err):
                raise
            raise write_failed(self.root / tag, err, then="the earlier checkpoints are kept") from None
        barrier()
        if self.info.is_main:
            atomic_write_json(self.root / tag / STATE, payload)
            if final.exists():  # left by an earlier trajectory that was resumed from an older checkpoint
                shutil.rmtree(final)
                shutil.rmtree(universal_of(final), ignore_errors=True)  # converted from what was there
            (self.root / tag).rename(final)
            fsync_dir(self.root)
            self._prune()
        barrier()
        self.saved.add(state.tag())
        log.info("checkpoint %s (epoch %d, step %d)", final, state.epoch, state.step)
        return final

    def _prune(self) -> None:
        for old in self.complete()[: -self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for converted in self.root.glob("*" + UNIVERSAL):  # kept while the checkpoint it came from is
            if not (self.root / converted.name.removesuffix(UNIVERSAL) / STATE).is_file():
                shutil.rmtree(converted, ignore_errors=True)

    def find(self, resume: str) -> Saved | None:
        """The checkpoint `resume` names: "auto" (newest complete or none), "none", or a path."""
        if resume == "none":
            if self.complete():
                raise UserError(
                    f"{self.root} already holds checkpoints; resume=none would train over them: use resume=auto, "
                    "or a new run.dir"
                )
            return None
        if resume == "auto":
            found = self.complete()
            return Saved.read(found[-1]) if found else None
        path = Path(resume)
        if not (path / STATE).is_file():
            raise UserError(f"resume={resume}: not a complete checkpoint (no {STATE})")
        return Saved.read(path)

    def universal(self, saved: Saved, world: int, zero_stage: int, forced: bool) -> Path | None:
        """The folder DeepSpeed loads `saved` from at `world` ranks through Universal Checkpointing, when
        it must (ZeRO 1-3 partitions written by another number of ranks) or `forced` (the config's
        deepspeed.overrides asks for checkpoint.load_universal); None when the checkpoint loads as it is.
        Rank 0 converts it once; every rank waits for the result."""
        if zero_stage == 0 or (saved.state.world_size == world and not forced):
            return None
        problem, target = "", universal_of(saved.path)
        if self.info.is_main:
            try:
                convert_once(saved, target)
            except UserError as err:
                problem = str(err)
        problem = broadcast_object(problem)
        if problem:
            raise UserError(problem)
        return target

    def load(self, engine: Engine, saved: Saved, universal: Path | None) -> dict[str, torch.Tensor]:
        """DeepSpeed's state (from the universal folder when given) and this rank's RNG; returns this
        rank's extra state (the task's: an EMA, say)."""
        path = saved.path
        if universal is None:
            ds.load_checkpoint(engine, path.parent, path.name)
        else:
            ds.load_universal(engine, universal)
        rng_file = path / f"rng-rank{self.info.rank:05d}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        if path.parent == self.root:  # a run resumed at step N never writes over the checkpoint of step N
            self.saved.add(path.name)
        # a rank without its own file holds what rank 0 saved for every rank (an EMA below ZeRO-3)
        extra_file = next(
            (f for f in (path / extra_name(self.info.rank), path / extra_name(0)) if f.is_file()), None
        )
        extra = load_file(str(extra_file)) if extra_file is not None else {}
        s = saved.state
        how = f" through DeepSpeed's universal checkpoint {universal.name}" if universal else ""
        log.info(
            "resumed from %s%s: epoch %d, step %d, %d micro-batches into the epoch",
            path,
            how,
            s.epoch,
            s.step,
            s.micro_in_epoch,
        )
        return extra


def universal_of(checkpoint: Path) -> Path:
    return checkpoint.with_name(checkpoint.name + UNIVERSAL)


def convert_once(saved: Saved, target: Path) -> None:
    """`saved` converted into `target` by DeepSpeed's ds_to_universal, unless a whole conversion of this
    very checkpoint is there already (its marker holds the checkpoint's trainer_state.json). Written
    under a `.partial-` name and renamed when whole: a conversion cut short is never used, and redone."""
    marker = (saved.path / STATE).read_bytes()
    if (target / SOURCE).is_file() and (target / SOURCE).read_bytes() == marker:
        return
    require_partitions(saved)
    staging = target.with_name(PARTIAL + target.name)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        ds.to_universal(saved.path, staging)
        (staging / SOURCE).write_bytes(marker)
        fsync_dir(staging)
    except (OSError, RuntimeError) as err:
        shutil.rmtree(staging, ignore_errors=True)
        if is_write_error(err):
            raise write_failed(staging, err, then="the checkpoint itself is untouched") from None
        raise
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    fsync_dir(target.parent)
    log.info("converted %s to DeepSpeed's universal format: %s", saved.path, target)


def require_partitions(saved: Saved) -> None:
    """Every rank's ZeRO partition of `saved` is there (a checkpoint copied in part would otherwise
    convert into an optimizer state with holes)."""
    ranks = saved.state.world_size
    found = {
        int(m.group(1))
        for f in saved.path.glob("*zero_pp_rank_*_optim_states.pt")
        if (m := re.search(r"zero_pp_rank_(\d+)_", f.name))
    }
    missing = sorted(set(range(ranks)) - found)
    if missing:
        raise UserError(
            f"{saved.path} is incomplete: it was written by {ranks} ranks, but the ZeRO partitions of rank(s) "
            f"{', '.join(map(str, missing))} (zero_pp_rank_*_optim_states.pt) are missing; resume from a whole copy"
        )


def check_fits(
    saved: Saved,
    objective: str,
    zero_stage: int,
    groups: list[list[str]],
    shapes: dict[str, list[int]],
    world: int,
) -> None:
    """Refuse, in one line, a checkpoint this run cannot continue: another task, another ZeRO stage,
    another model (its trainable parameters by name, optimizer group and shape), or task state that
    is partitioned over the ranks that wrote it (the ZeRO-3 EMA) on another number of ranks."""
    where = saved.path
    was = saved.setting("train", "objective")
    if was != objective:
        raise UserError(
            f"{where} was trained with train.objective={was}, this run has {objective}: resume with the same "
            "objective, or use a new run.dir"
        )
    stage = saved.setting("deepspeed", "zero_stage")
    if stage != zero_stage:
        raise UserError(
            f"{where} was written under deepspeed.zero_stage={stage}, this run has {zero_stage}: resume with "
            f"zero_stage={stage}, or use a new run.dir"
        )
    difference = model_difference(saved.groups, saved.shapes, groups, shapes)
    if difference:
        raise UserError(
            f"{where} holds another model: {difference}; resume with the model config it was trained with, "
            "or use a new run.dir"
        )
    partitioned = sorted(where.glob("extra-rank*.safetensors"))
    if len(partitioned) > 1 and saved.state.world_size != world:
        raise UserError(
            f"{where} holds task state partitioned over its {saved.state.world_size} ranks ({partitioned[0].name}, "
            f"…: the ZeRO-3 EMA); resume it with {saved.state.world_size} ranks"
        )


def model_difference(
    was_groups: list[list[str]],
    was_shapes: dict[str, list[int]],
    groups: list[list[str]],
    shapes: dict[str, list[int]],
) -> str:
    """The first difference between two models' trainable parameters, in words ("" when none). A
    checkpoint that recorded no shapes (written before they were) is compared by names alone: its
    groups were recorded wrongly under ZeRO-3 (every partitioned tensor looked 1-D)."""
    was = {name: i for i, names in enumerate(was_groups) for name in names}
    now = {name: i for i, names in enumerate(groups) for name in names}
    for name in now:
        if name not in was:
            return f"parameter {name} trains here, not there"
    for name in was:
        if name not in now:
            return f"parameter {name} trained there, not here"
    if not was_shapes:
        return ""
    for name, group in now.items():
        if list(was_shapes.get(name, [])) != list(shapes[name]):
            return f"parameter {name} is {list(was_shapes.get(name, []))} there, {list(shapes[name])} here"
        if was[name] != group:
            return f"parameter {name} is in optimizer group {was[name]} there, {group} here"
    if [n for g in was_groups for n in g] != [n for g in groups for n in g]:
        return "its parameters are in another order"
    return ""


def extra_name(rank: int) -> str:
    return f"extra-rank{rank:05d}.safetensors"


def extra_states(checkpoint: Path) -> list[dict[str, torch.Tensor]]:
    """Every rank's extra state in a checkpoint, in rank order (empty when the task keeps none)."""
    return [load_file(str(f)) for f in sorted(checkpoint.glob("extra-rank*.safetensors"))]
