"""The training data pipeline, built from manifest.json (never from globs).

Every epoch is planned from the manifest alone, identically on every rank (trainer/plan.py):

1. shards in a seeded per-epoch order;
2. the concatenated samples cut into R × W equal contiguous slots (R ranks, W loader workers per
   rank), so every rank runs the same number of steps (unequal counts hang collectives) and at most
   R × W × batch samples an epoch are left out (a different few each epoch);
3. each slot is read by one worker: its shard ranges → a seeded shuffle buffer → skip what a resumed
   run already trained on → decode → the task's preprocessing → fixed-size batches.

The DataLoader takes batches from its workers in strict turn, so micro-batch i of an epoch is batch
i // W of worker i % W. A checkpoint therefore only needs the epoch and the number of micro-batches
consumed to resume with exactly the batches an uninterrupted run would have seen (same seed, world
size and workers). WebDataset alone does not give this: its shard split depends on timing.
"""

from __future__ import annotations

import itertools
import logging
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import webdataset as wds
from omegaconf import MISSING
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.manifest import Manifest
from core.shards import Shard, cut, decode, read_ranges, split_shards
from plumbing.config import require
from plumbing.seeds import derive_seed

if TYPE_CHECKING:
    from trainer.tasks.base import Task

log = logging.getLogger("trainer.data")

Prep = Callable[[dict[str, Any], int, bool], dict[str, Any]]
Collate = Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass
class DataConfig:
    manifest: str = MISSING
    """manifest.json written by data_prep (or the folder that holds it)."""
    train_split: str = "train"
    """Split to train on."""
    eval_split: str = "test"
    """Split to evaluate on (CIFAR-10: test; Flickr8k: test or dev)."""
    workers: int = 2
    """DataLoader worker processes per rank (0: load in the training process)."""
    shuffle_buffer: int = 1000
    """Samples held by each worker's shuffle buffer."""
    shuffle_shards: bool = True
    """Shuffle the shard order every epoch (seeded by run.seed and the epoch)."""
    random_crop: bool = False
    """Train augmentation: a random resized crop (scale crop_scale_min..1) instead of the centre crop."""
    crop_scale_min: float = 0.8
    """Smallest area fraction of the random resized crop."""
    hflip: bool = False
    """Train augmentation: random horizontal flips (off: captions may say left or right)."""
    max_bad_fraction: float = 0.01
    """More than this fraction of undecodable samples stops the run (they are skipped and counted)."""
    captions: str = "draw"
    """Which caption of a multi-caption sample (Flickr8k: 5) trains: "draw" (one per epoch, drawn from the sample's seed: all of them get used) or "first" (always the first, as open_clip reads `txt`). Evaluation uses the first."""
    verify: str = "sha256"
    """Check shards: "sha256" (sizes before training; each shard's sha256 as the loader reads it through), "size", or "none"."""

    def __post_init__(self) -> None:
        require(self.workers >= 0, self, "workers", "an int >= 0")
        require(self.shuffle_buffer >= 1, self, "shuffle_buffer", "an int >= 1")
        require(0 < self.crop_scale_min <= 1, self, "crop_scale_min", "a fraction in (0, 1]")
        require(0 <= self.max_bad_fraction < 1, self, "max_bad_fraction", "a fraction in [0, 1)")
        require(self.captions in ("draw", "first"), self, "captions", '"draw" or "first"')
        require(self.verify in ("sha256", "size", "none"), self, "verify", '"sha256", "size" or "none"')


@dataclass(frozen=True)
class Layout:
    """How an epoch is cut: ranks × workers slots of `per_slot` samples, in batches of `batch`."""

    ranks: int
    workers: int  # loader workers per rank; 1 when loading in the training process
    batch: int
    per_slot: int

    @property
    def batches_per_slot(self) -> int:
        return self.per_slot // self.batch

    @property
    def micro_batches(self) -> int:
        """Micro-batches per rank per epoch."""
        return self.batches_per_slot * self.workers


# --------------------------------------------------------------------------- stages


def shuffle(stream: Iterator[dict[str, Any]], bufsize: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """A shuffle buffer driven by its own seeded generator, so the order replays exactly on resume."""
    buffer: list[dict[str, Any]] = []
    for sample in stream:
        if len(buffer) < bufsize:
            buffer.append(sample)
            continue
        i = rng.randrange(len(buffer))
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def skip(stream: Iterator[dict[str, Any]], count: int) -> Iterator[dict[str, Any]]:
    return itertools.islice(stream, count, None)


def decode_or_substitute(stream: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """A sample that fails to decode is counted (`skipped`) and replaced by the next good one, so the
    slot still yields its planned count and every rank runs the same number of steps."""
    pending = 0
    for raw in stream:
        try:
            sample = decode(raw)
        except Exception as err:  # any decoder failure: PIL, json, int
            log.warning(
                "skipping undecodable sample %s in %s (%s)", raw.get("__key__"), raw.get("__url__"), err
            )
            pending += 1
            continue
        copies = [
            {**sample, "skipped": 0, "substitute": True} for _ in range(pending)
        ]  # before later stages edit it
        sample["skipped"] = pending
        yield sample
        yield from copies
        pending = 0
    if pending:
        raise RuntimeError(f"the last {pending} samples of a data slot do not decode")


def pick_caption(sample: dict[str, Any], draw: int, train: bool, mode: str = "draw") -> dict[str, Any]:
    """One of the sample's captions as `text` (in training with mode "draw", drawn per epoch; else the
    first), all of them as `captions`."""
    captions = sample.get("meta", {}).get("captions") or ([sample["text"]] if "text" in sample else [])
    if captions:
        sample["text"] = captions[draw % len(captions)] if train and mode == "draw" else captions[0]
        sample["captions"] = captions
    return sample


def prepare(sample: dict[str, Any], prep: Prep, seed: int, epoch: int, train: bool) -> dict[str, Any]:
    """The task's preprocessing with the sample's own seed: drawn from its key and the epoch, not from
    the order, so a resumed run draws exactly what an uninterrupted one would."""
    return prep(sample, derive_seed(seed, "sample", epoch, sample["key"]), train)


def batched(
    stream: Iterator[dict[str, Any]], size: int, count: int, collate: Collate
) -> Iterator[dict[str, Any]]:
    """Exactly `count` batches of `size` (the plan guarantees the samples exist)."""
    for _ in range(count):
        batch = list(itertools.islice(stream, size))
        if len(batch) < size:
            raise RuntimeError(
                f"a data slot ran out after {len(batch)} of {size} samples: shards changed since planning?"
            )
        yield collate(batch)


# --------------------------------------------------------------------------- datasets


class TrainEpoch(IterableDataset):
    """One epoch of one rank; each loader worker reads its own slot."""

    def __init__(
        self,
        shards: list[Shard],
        layout: Layout,
        rank: int,
        epoch: int,
        start: int,
        shuffle_buffer: int,
        seed: int,
        prep: Prep,
        collate: Collate,
    ) -> None:
        super().__init__()
        self.shards, self.layout, self.rank, self.epoch, self.start = shards, layout, rank, epoch, start
        self.shuffle_buffer, self.seed, self.prep, self.collate = shuffle_buffer, seed, prep, collate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lay = self.layout
        # The DataLoader asks its worker 0 first; after a resume the next micro-batch, number `start`,
        # belongs to slot worker start % W, so loader workers are rotated onto slot workers.
        worker = ((info.id if info is not None else 0) + self.start) % lay.workers
        slot = self.rank * lay.workers + worker
        # Micro-batches i < start were trained already; slot worker w made those with i % W == w.
        done = max(0, -(-(self.start - worker) // lay.workers))
        ranges = cut(self.shards, slot * lay.per_slot, (slot + 1) * lay.per_slot)
        rng = random.Random(derive_seed(self.seed, "shuffle", self.epoch, slot))
        prep = partial(prepare, prep=self.prep, seed=self.seed, epoch=self.epoch, train=True)
        pipeline = wds.DataPipeline(
            partial(read_ranges, ranges),  # this slot's samples as raw bytes (webdataset's tar reader)
            partial(shuffle, bufsize=self.shuffle_buffer, rng=rng),  # seeded: replays exactly on resume
            partial(skip, count=done * lay.batch),  # trained before a resume: dropped before decoding, cheap
            decode_or_substitute,  # an undecodable sample is counted and replaced, never fatal here
            partial(map, prep),  # the task's preprocessing; one of an image's captions, drawn per epoch
            partial(batched, size=lay.batch, count=lay.batches_per_slot - done, collate=self.collate),
        )
        return iter(pipeline)


class EvalData(IterableDataset):
    """The eval split, each sample exactly once across ranks and workers. Slots are padded with
    flagged repeats to equal length, so every rank runs the same number of forward passes (ZeRO-3
    gathers parameters in every forward; unequal counts would hang)."""

    def __init__(
        self,
        shards: list[Shard],
        ranks: int,
        workers: int,
        rank: int,
        batch: int,
        prep: Prep,
        collate: Collate,
    ) -> None:
        super().__init__()
        self.shards, self.ranks, self.workers, self.rank, self.batch = (
            shards,
            ranks,
            max(1, workers),
            rank,
            batch,
        )
        self.prep, self.collate = prep, collate
        self.total = sum(n for _, n, _ in shards)
        self.per_slot = -(-self.total // (self.ranks * self.workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = self.rank * self.workers + (info.id if info is not None else 0)
        start = min(self.total, slot * self.per_slot)
        stop = min(self.total, start + self.per_slot)
        samples = decode_or_substitute(read_ranges(cut(self.shards, start, stop)))
        samples = (
            prepare(s, self.prep, 0, 0, train=False) | {"index": start + i} for i, s in enumerate(samples)
        )
        padded = _pad(samples, self.per_slot)
        for _ in range(-(-self.per_slot // self.batch)):
            chunk = list(itertools.islice(padded, self.batch))
            if chunk:
                yield self.collate(chunk)


def _pad(samples: Iterator[dict[str, Any]], length: int) -> Iterator[dict[str, Any]]:
    last = None
    n = 0
    for sample in samples:
        last = sample
        n += 1
        yield sample
    if last is None and length:
        raise RuntimeError("an eval slot is empty: fewer eval samples than ranks × workers")
    for _ in range(length - n):
        yield {**last, "valid": False}


def _ignore_stop_signals(_worker: int) -> None:
    """Slurm signals every process of a step: loader workers leave USR1/TERM to the trainer, which
    finishes its step and checkpoints (workers end with it; killed, they would crash that step)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def loader(dataset: IterableDataset, workers: int, pin: bool) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # batches are made in the workers, in the planned order
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=_ignore_stop_signals if workers else None,
    )


class TrainData:
    """One rank's view of the data: the train loader of an epoch, the eval loader, as planned."""

    def __init__(
        self,
        cfg: DataConfig,
        manifest: Manifest,
        layout: Layout,
        micro_per_epoch: int,
        rank: int,
        seed: int,
        prep: Prep,
        collate: Collate,
        pin: bool,
    ) -> None:
        self.cfg, self.manifest, self.layout, self.micro_per_epoch = cfg, manifest, layout, micro_per_epoch
        self.rank, self.seed, self.prep, self.collate, self.pin = rank, seed, prep, collate, pin

    @classmethod
    def of(
        cls,
        cfg: DataConfig,
        manifest: Manifest,
        layout: Layout,
        micro_per_epoch: int,
        rank: int,
        seed: int,
        task: Task,
        device: str,
    ) -> TrainData:
        """Rank `rank`'s data as the plan lays it out, preprocessed and batched by `task`."""
        pin = device.startswith("cuda")
        return cls(cfg, manifest, layout, micro_per_epoch, rank, seed, task.prep, task.collate, pin)

    def epoch(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """The micro-batches of `epoch` from number `start` on (those before were trained already)."""
        verify = self.cfg.verify == "sha256"
        shards = split_shards(
            self.manifest, self.cfg.train_split, self.seed, epoch, self.cfg.shuffle_shards, verify
        )
        dataset = TrainEpoch(
            shards,
            self.layout,
            self.rank,
            epoch,
            start,
            self.cfg.shuffle_buffer,
            self.seed,
            self.prep,
            self.collate,
        )
        return batches_of(loader(dataset, self.cfg.workers, self.pin), max(0, self.micro_per_epoch - start))

    def eval_batches(self, batch: int) -> Iterator[dict[str, Any]]:
        shards = split_shards(self.manifest, self.cfg.eval_split, verify=self.cfg.verify == "sha256")
        dataset = EvalData(
            shards, self.layout.ranks, self.cfg.workers, self.rank, batch, self.prep, self.collate
        )
        return batches_of(loader(dataset, self.cfg.workers, self.pin))


def batches_of(data: DataLoader, count: int | None = None) -> Iterator[dict[str, Any]]:
    """The loader's batches (at most `count`); its worker processes are shut down however this ends —
    exhausted, closed early, or by an error raised in a worker. Left to the garbage collector, workers of
    a loader that raised keep the process from exiting (multiprocessing joins them at exit)."""
    batches = iter(data)
    try:
        yield from itertools.islice(batches, count)
    finally:
        shutdown = getattr(batches, "_shutdown_workers", None)  # torch's multi-process iterator
        if shutdown is not None:
            shutdown()
