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

A run resumed mid-epoch under another layout (ranks, loader workers, batch or shuffle buffer) reads the
rest of that epoch as a new *leg*: which samples the earlier legs trained follows from their layouts and
micro-batch counts alone (each slot's shuffle replays on sample positions, no data read), and the samples
not yet trained are cut over the new layout exactly as a whole epoch is: equal slots, whole batches, whole
optimizer steps; what does not fill them is left out, as at every epoch's end (fewer than ranks × workers
× batch × grad_accum samples). The next epochs follow the new layout's plan.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np
import webdataset as wds
from omegaconf import MISSING
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from core.manifest import Manifest
from core.shards import Shard, caption_list, cut, decode, read_ranges, split_shards
from plumbing.config import require
from plumbing.process import die_with_parent, helper_server
from plumbing.seeds import derive_seed
from plumbing.watchdog import stacks_on_request

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
    decode: str = "cpu"
    """Where JPEGs are decoded: "cpu" (in the loader workers, at the smallest JPEG scale that keeps the crop's resolution) or "gpu" (the workers plan each crop from the header and pass the bytes; the training process decodes the batch with nvJPEG and crops on the GPU; CLIP tasks only; without a GPU it decodes on its own CPU)."""

    def __post_init__(self) -> None:
        require(self.workers >= 0, self, "workers", "an int >= 0")
        require(self.shuffle_buffer >= 1, self, "shuffle_buffer", "an int >= 1")
        require(0 < self.crop_scale_min <= 1, self, "crop_scale_min", "a fraction in (0, 1]")
        require(0 <= self.max_bad_fraction < 1, self, "max_bad_fraction", "a fraction in [0, 1)")
        require(self.captions in ("draw", "first"), self, "captions", '"draw" or "first"')
        require(self.verify in ("sha256", "size", "none"), self, "verify", '"sha256", "size" or "none"')
        require(self.decode in ("cpu", "gpu"), self, "decode", '"cpu" or "gpu"')


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

    @classmethod
    def over(cls, samples: int, ranks: int, workers: int, batch: int) -> Layout:
        """`samples` cut into ranks × workers equal slots (what does not divide is left out)."""
        workers = max(1, workers)
        return cls(ranks, workers, batch, samples // (ranks * workers))

    def done_in_slot(self, worker: int, micro: int) -> int:
        """Batches slot worker `worker` made for the first `micro` micro-batches of its rank."""
        return min(self.batches_per_slot, max(0, -(-(micro - worker) // self.workers)))


@dataclass(frozen=True)
class Leg:
    """A stretch of one epoch read under one layout: ranks × workers slots, batches of `batch`, each slot
    through a seeded shuffle buffer of `shuffle` samples; `micro` micro-batches per rank were trained."""

    ranks: int
    workers: int
    batch: int
    shuffle: int
    micro: int = 0

    def same_layout(self, other: Leg) -> bool:
        return (self.ranks, max(1, self.workers), self.batch, self.shuffle) == (
            other.ranks,
            max(1, other.workers),
            other.batch,
            other.shuffle,
        )


def shuffle_seed(seed: int, epoch: int, slot: int, leg: int) -> int:
    """The seed of a slot's shuffle buffer. Leg 0 (an epoch read in one go) keeps the seed it always had,
    so checkpoints written before legs existed replay the same order."""
    if leg == 0:
        return derive_seed(seed, "shuffle", epoch, slot)
    return derive_seed(seed, "shuffle", epoch, slot, "leg", leg)


def untrained(total: int, legs: Sequence[Leg], seed: int, epoch: int) -> np.ndarray:
    """Positions (in the epoch's shard order, ascending) of the samples the `legs` of `epoch` did not
    train. Each leg cut the samples its predecessors left over its own layout; a slot trained the first
    batches of its seeded shuffle, which replays here on the positions alone (the shuffle's draws depend
    only on how many samples pass, never on their bytes)."""
    pool = np.arange(total, dtype=np.int64)
    for index, leg in enumerate(legs):
        layout = Layout.over(len(pool), leg.ranks, leg.workers, leg.batch)
        trained: list[int] = []
        for slot in range(leg.ranks * layout.workers):
            count = layout.done_in_slot(slot % layout.workers, leg.micro) * leg.batch
            if count:
                mine = pool[slot * layout.per_slot : (slot + 1) * layout.per_slot].tolist()
                rng = random.Random(shuffle_seed(seed, epoch, slot, index))
                trained += itertools.islice(shuffle(iter(mine), leg.shuffle, rng), count)
        pool = np.setdiff1d(pool, np.asarray(trained, dtype=np.int64), assume_unique=True)
    return pool


@dataclass(frozen=True)
class Rest:
    """The samples of an epoch that earlier legs left untrained, read as a leg of their own."""

    epoch: int
    legs: tuple[Leg, ...]  # the epoch's earlier legs, oldest first
    layout: Layout  # the untrained samples cut over this run's ranks × workers
    micro: int  # micro-batches per rank this leg trains (whole optimizer steps)
    pool: np.ndarray = field(repr=False, compare=False)  # their positions, ascending

    @property
    def leg(self) -> int:
        return len(self.legs)


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


def read_positions(shards: list[Shard], positions: Sequence[int]) -> Iterator[dict[str, Any]]:
    """Raw samples at `positions` (ascending) of the concatenation of `shards`, each shard read once,
    up to the last sample wanted from it (and checked against its sha256 when read to its end)."""
    offset, i = 0, 0
    for shard in shards:
        count = shard[1]
        first = i
        while i < len(positions) and positions[i] < offset + count:
            i += 1
        if i > first:
            wanted = {int(p) - offset for p in positions[first:i]}
            lo, hi = int(positions[first]) - offset, int(positions[i - 1]) - offset + 1
            samples = read_ranges(cut([shard], lo, hi))
            yield from (s for at, s in enumerate(samples, start=lo) if at in wanted)
        offset += count


def decode_or_substitute(
    stream: Iterator[dict[str, Any]], prep: Callable[[dict[str, Any]], dict[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Each sample decoded and prepared by the task (`prep`: the image is decoded there, at the size
    the task needs, core.shards.decode). A sample that fails is counted (`skipped`) and replaced by
    the next good one, so the slot still yields its planned count and every rank runs the same number
    of steps."""
    pending = 0
    for raw in stream:
        try:
            sample = prep(decode(raw))
        except Exception as err:  # any decoder failure: PIL, json, int
            log.warning(
                "skipping undecodable sample %s in %s (%s)", raw.get("__key__"), raw.get("__url__"), err
            )
            pending += 1
            continue
        copies = [{**sample, "skipped": 0, "substitute": True} for _ in range(pending)]
        sample["skipped"] = pending
        yield sample
        yield from copies
        pending = 0
    if pending:
        raise RuntimeError(f"the last {pending} samples of a data slot do not decode")


def pick_caption(sample: dict[str, Any], draw: int, train: bool, mode: str = "draw") -> dict[str, Any]:
    """One of the sample's captions as `text` (in training with mode "draw", drawn per epoch; else the
    first), all of them as `captions`."""
    captions = caption_list(sample.get("meta"), sample.get("text"))
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
    """One epoch (or the rest of one, `rest`) of one rank; each loader worker reads its own slot."""

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
        rest: Rest | None = None,
    ) -> None:
        super().__init__()
        self.shards, self.layout, self.rank, self.epoch, self.start = shards, layout, rank, epoch, start
        self.shuffle_buffer, self.seed, self.prep, self.collate = shuffle_buffer, seed, prep, collate
        self.rest = rest

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lay = self.layout
        # The DataLoader asks its worker 0 first; after a resume the next micro-batch, number `start`,
        # belongs to slot worker start % W, so loader workers are rotated onto slot workers.
        worker = ((info.id if info is not None else 0) + self.start) % lay.workers
        slot = self.rank * lay.workers + worker
        # Micro-batches i < start were trained already; slot worker w made those with i % W == w.
        done = lay.done_in_slot(worker, self.start)
        if self.rest is None:  # the whole epoch: a contiguous range of its samples
            leg = 0
            source = partial(read_ranges, cut(self.shards, slot * lay.per_slot, (slot + 1) * lay.per_slot))
        else:  # what earlier legs left: scattered positions, each shard read once
            leg, mine = self.rest.leg, self.rest.pool[slot * lay.per_slot : (slot + 1) * lay.per_slot]
            source = partial(read_positions, self.shards, mine)
        rng = random.Random(shuffle_seed(self.seed, self.epoch, slot, leg))
        prep = partial(prepare, prep=self.prep, seed=self.seed, epoch=self.epoch, train=True)
        pipeline = wds.DataPipeline(
            source,  # this slot's samples as raw bytes (webdataset's tar reader)
            partial(shuffle, bufsize=self.shuffle_buffer, rng=rng),  # seeded: replays exactly on resume
            partial(skip, count=done * lay.batch),  # trained before a resume: dropped before decoding, cheap
            # decoded as the task's preprocessing needs it (one of an image's captions, drawn per epoch);
            # an undecodable sample is counted and replaced, never fatal here
            partial(decode_or_substitute, prep=prep),
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
        prep = partial(prepare, prep=self.prep, seed=0, epoch=0, train=False)
        samples = decode_or_substitute(read_ranges(cut(self.shards, start, stop)), prep)
        samples = (s | {"index": start + i} for i, s in enumerate(samples))
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


def _ignore_stop_signals(_worker: int, parent: int = 0) -> None:
    """Slurm signals every process of a step: loader workers leave USR1/TERM to the trainer, which
    finishes its step and checkpoints (workers end with it; killed, they would crash that step).
    Ignoring TERM, they must die with their parent, the rank's fork server, which ends when its rank
    does however it ends (SIGKILL, a watchdog): see plumbing.process.die_with_parent."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    die_with_parent(parent)
    stacks_on_request()  # a worker that stopped delivering shows where, before the watchdog kills it


def loader_server(workers: int, *helpers: object) -> int | None:
    """The rank's fork server for its loader workers (plumbing.process.helper_server), started before
    the model is built, with this module and those of `helpers` (the task's prep and collate) imported
    in it; None without workers. A worker starts from it in milliseconds, with the dataset pickled."""
    if not workers:
        return None
    return helper_server(list(dict.fromkeys([__name__, *(type(h).__module__ for h in helpers)])))


def loader(dataset: IterableDataset, workers: int, pin: bool, server: int | None = None) -> DataLoader:
    """`server`: the pid of `loader_server`'s fork server, whose workers are forked from it; without
    one (a tool, a test), workers are forked from this process."""
    return DataLoader(
        dataset,
        batch_size=None,  # batches are made in the workers, in the planned order
        num_workers=workers,
        pin_memory=pin,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        multiprocessing_context="forkserver" if workers and server else None,
        worker_init_fn=partial(_ignore_stop_signals, parent=server or os.getpid()) if workers else None,
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
        rest: Rest | None = None,
        server: int | None = None,
    ) -> None:
        self.cfg, self.manifest, self.layout, self.micro_per_epoch = cfg, manifest, layout, micro_per_epoch
        self.rank, self.seed, self.prep, self.collate, self.pin = rank, seed, prep, collate, pin
        self.rest, self.server = rest, server

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
        rest: Rest | None = None,
    ) -> TrainData:
        """Rank `rank`'s data as the plan lays it out (`rest`: what is left of a resumed epoch that
        earlier legs read in part), preprocessed and batched by `task`; its loader workers' fork
        server started (before the model is built: see `loader_server`)."""
        pin = device.startswith("cuda")
        server = loader_server(cfg.workers, task.prep, task.collate)
        return cls(
            cfg, manifest, layout, micro_per_epoch, rank, seed, task.prep, task.collate, pin, rest, server
        )

    def epoch(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """The micro-batches of `epoch` from number `start` on (those before were trained already)."""
        verify = self.cfg.verify == "sha256"
        shards = split_shards(
            self.manifest, self.cfg.train_split, self.seed, epoch, self.cfg.shuffle_shards, verify
        )
        rest = self.rest if self.rest is not None and self.rest.epoch == epoch else None
        dataset = TrainEpoch(
            shards,
            rest.layout if rest else self.layout,
            self.rank,
            epoch,
            start,
            self.cfg.shuffle_buffer,
            self.seed,
            self.prep,
            self.collate,
            rest,
        )
        count = (rest.micro if rest else self.micro_per_epoch) - start
        return batches_of(loader(dataset, self.cfg.workers, self.pin, self.server), max(0, count))

    def eval_batches(self, batch: int) -> Iterator[dict[str, Any]]:
        shards = split_shards(self.manifest, self.cfg.eval_split, verify=self.cfg.verify == "sha256")
        dataset = EvalData(
            shards, self.layout.ranks, self.cfg.workers, self.rank, batch, self.prep, self.collate
        )
        return batches_of(loader(dataset, self.cfg.workers, self.pin, self.server))


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
