"""Checkpoints: DeepSpeed's engine state plus the trainer's own state, written so that a crash during a
save never breaks the newest usable checkpoint.

A save goes to `checkpoints/.partial-<tag>/`; when every rank has written its part, rank 0 adds
`trainer_state.json` (the marker of a complete checkpoint) and renames the folder to `<tag>`.
`resume: auto` takes the newest folder with that marker; partial folders are removed at the next save.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from plumbing.config import require
from plumbing.dist import DistInfo, barrier
from plumbing.errors import UserError
from plumbing.files import atomic_write_json, fsync_dir, is_write_error, read_json, write_failed
from trainer import engine as ds
from trainer.data import Layout
from trainer.engine import Engine

log = logging.getLogger("trainer.checkpoint")
STATE = "trainer_state.json"
PARTIAL = ".partial-"


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

    @classmethod
    def of(cls, layout: Layout) -> TrainState:
        """A fresh run's state; the data layout is recorded so that a resume can check it."""
        return cls(world_size=layout.ranks, loader_workers=layout.workers, micro_batch=layout.batch)

    def tag(self) -> str:
        return f"step-{self.step:08d}"


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
        payload = {"state": asdict(state), "config": config, "param_groups": groups}
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

    def find(self, resume: str) -> Path | None:
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
            return found[-1] if found else None
        path = Path(resume)
        if not (path / STATE).is_file():
            raise UserError(f"resume={resume}: not a complete checkpoint (no {STATE})")
        return path

    def load(
        self, engine: Engine, path: Path, expect: TrainState
    ) -> tuple[TrainState, dict[str, torch.Tensor]]:
        """The trainer state, with DeepSpeed's and the RNG's restored; and this rank's extra state."""
        payload = read_json(path / STATE)
        state = TrainState(**payload["state"])
        if state.world_size != expect.world_size:
            raise UserError(
                f"{path} was written by {state.world_size} ranks, this run has {expect.world_size}: resume with the same "
                "world size (ZeRO partitions depend on it)"
            )
        ds.load_checkpoint(engine, path.parent, path.name)
        rng_file = path / f"rng-rank{self.info.rank:05d}.pt"
        if rng_file.is_file():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        if (state.loader_workers, state.micro_batch) != (
            expect.loader_workers,
            expect.micro_batch,
        ) and state.micro_in_epoch:
            log.warning(
                "data layout changed since %s (workers %d→%d, batch %d→%d): the rest of epoch %d is skipped",
                path.name,
                state.loader_workers,
                expect.loader_workers,
                state.micro_batch,
                expect.micro_batch,
                state.epoch,
            )
            state.epoch, state.micro_in_epoch = state.epoch + 1, 0
        state.loader_workers, state.micro_batch = expect.loader_workers, expect.micro_batch
        # a rank without its own file holds what rank 0 saved for every rank (an EMA below ZeRO-3)
        extra_file = next(
            (f for f in (path / extra_name(self.info.rank), path / extra_name(0)) if f.is_file()), None
        )
        extra = load_file(str(extra_file)) if extra_file is not None else {}
        log.info(
            "resumed from %s: epoch %d, step %d, %d micro-batches into the epoch",
            path,
            state.epoch,
            state.step,
            state.micro_in_epoch,
        )
        return state, extra


def extra_name(rank: int) -> str:
    return f"extra-rank{rank:05d}.safetensors"


def extra_states(checkpoint: Path) -> list[dict[str, torch.Tensor]]:
    """Every rank's extra state in a checkpoint, in rank order (empty when the task keeps none)."""
    return [load_file(str(f)) for f in sorted(checkpoint.glob("extra-rank*.safetensors"))]
