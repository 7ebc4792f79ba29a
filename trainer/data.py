"""The WebDataset pipeline, built from manifest.json (never from globs).

Every epoch is planned from the manifest alone, identically on every rank:

1. shards in a seeded per-epoch order;
2. the concatenated samples cut into R × W equal contiguous slots (R ranks, W loader workers per
   rank), so every rank runs the same number of steps (unequal counts hang collectives) and at most
   R × W × batch samples an epoch are left out (a different few each epoch);
3. each slot is read by one worker: its shard ranges → a seeded shuffle buffer → skip what a resumed
   run already trained on → decode → preprocess → fixed-size batches.

The DataLoader takes batches from its workers in strict turn, so micro-batch i of an epoch is batch
i // W of worker i % W. A checkpoint therefore only needs the epoch and the number of micro-batches
consumed to resume with exactly the batches an uninterrupted run would have seen (same seed, world
size and workers). WebDataset alone does not give this: its shard split depends on timing.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import random
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from omegaconf import MISSING
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.manifest import Manifest, ShardRecord
from plumbing.config import require
from plumbing.errors import UserError
from plumbing.seeds import derive_seed

log = logging.getLogger("trainer.data")
IMAGE_KEYS = ("jpg", "jpeg", "png")


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
    verify: str = "sha256"
    """Check shards before training: "sha256" (size and checksum), "size", or "none"."""

    def __post_init__(self) -> None:
        require(self.workers >= 0, self, "workers", "an int >= 0")
        require(self.shuffle_buffer >= 1, self, "shuffle_buffer", "an int >= 1")
        require(0 < self.crop_scale_min <= 1, self, "crop_scale_min", "a fraction in (0, 1]")
        require(0 <= self.max_bad_fraction < 1, self, "max_bad_fraction", "a fraction in [0, 1)")
        require(self.verify in ("sha256", "size", "none"), self, "verify", '"sha256", "size" or "none"')


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Range:
    path: str
    start: int
    stop: int


def _cut(shards: list[tuple[str, int]], start: int, stop: int) -> list[Range]:
    """The shard ranges that hold samples [start, stop) of the concatenation of `shards`."""
    ranges, offset = [], 0
    for path, count in shards:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            ranges.append(Range(path, lo - offset, hi - offset))
        offset += count
    return ranges


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


def train_layout(total: int, ranks: int, workers: int, batch: int, split: str, manifest: Path) -> Layout:
    slots = ranks * max(1, workers)
    layout = Layout(ranks, max(1, workers), batch, total // slots)
    if layout.batches_per_slot == 0:
        raise UserError(
            f"{manifest}: split {split!r} has {total} samples, but {ranks} ranks × {max(1, workers)} loader workers × "
            f"batch {batch} need at least {slots * batch}; lower train.batch_size or data.workers, or add data"
        )
    return layout


def epoch_shards(
    shards: list[ShardRecord], root: Path, seed: int, epoch: int, shuffle: bool
) -> list[tuple[str, int]]:
    order = list(shards)
    if shuffle:
        random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    return [(str(root / s.name), s.num_samples) for s in order]


# --------------------------------------------------------------------------- stages


def read_ranges(ranges: list[Range]) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per extension) of the slot, read with webdataset's own tar reader."""
    for r in ranges:
        samples = wds.tariterators.tarfile_samples(iter([{"url": r.path}]))
        yield from itertools.islice(samples, r.start, r.stop)


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


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    """Only the handlers the harness needs: image (PIL), txt, json, cls. Never pickle."""
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None:
        raise ValueError("no image member")
    with Image.open(io.BytesIO(sample[key])) as image:
        image = image.convert("RGB")
    out: dict[str, Any] = {"key": sample["__key__"], "image": image}
    if "cls" in sample:
        out["label"] = int(sample["cls"])
    if "json" in sample:
        out["meta"] = json.loads(sample["json"])
    if "txt" in sample:
        out["text"] = sample["txt"].decode("utf-8")
    return out


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


def preprocess(
    sample: dict[str, Any], transform: ImageTransform, seed: int, epoch: int, train: bool
) -> dict[str, Any]:
    """Image → uint8 tensor; text → one caption. Randomness comes from the sample's key and the epoch,
    not from the order, so a resumed run draws exactly what an uninterrupted one would."""
    draw = derive_seed(seed, "sample", epoch, sample["key"])
    sample["pixel_values"] = transform(sample.pop("image"), random.Random(draw))
    captions = sample.get("meta", {}).get("captions") or ([sample["text"]] if "text" in sample else [])
    if captions:
        sample["text"] = captions[draw % len(captions)] if train else captions[0]
        sample["captions"] = captions
    return sample


def batched(
    stream: Iterator[dict[str, Any]],
    size: int,
    count: int,
    collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
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


class Collate:
    """Stacks and normalises images (the processor's mean and std) and tokenises texts with the
    model's tokenizer, once per batch."""

    def __init__(self, tokenizer: Any, max_length: int, with_text: bool, processor: Any) -> None:
        self.tokenizer, self.max_length, self.with_text = tokenizer, max_length, with_text
        self.mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(processor.image_std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        pixels = torch.stack([s["pixel_values"] for s in samples]).float()
        batch: dict[str, Any] = {
            "pixel_values": pixels.sub_(self.mean).div_(self.std),
            "keys": [s["key"] for s in samples],
            "skipped": sum(s.get("skipped", 0) for s in samples),
            "valid": torch.tensor([s.get("valid", True) and not s.get("substitute", False) for s in samples]),
            "index": torch.tensor([s.get("index", -1) for s in samples]),
        }
        if "label" in samples[0]:
            batch["labels"] = torch.tensor([s["label"] for s in samples])
        if self.with_text:
            tokens = self.tokenize([s["text"] for s in samples])
            batch["input_ids"], batch["attention_mask"] = tokens["input_ids"], tokens["attention_mask"]
        if "captions" in samples[0]:
            batch["captions"] = [s["captions"] for s in samples]
        return batch

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )


@dataclass(frozen=True)
class ImageTransform:
    """CLIP preprocessing with the model's own processor values, done in PIL as CLIPImageProcessor does
    it: the short side resized (bicubic) to `size`, then a centre crop; for training optionally a
    random resized crop (torchvision's recipe) and horizontal flips, drawn from the sample's own
    generator. Gives uint8 CHW: Collate normalises whole batches at once (per image it cost more than
    the resize)."""

    size: int
    crop: tuple[int, int]  # height, width
    random_crop: bool = False
    scale_min: float = 0.8
    hflip: bool = False

    @classmethod
    def of(cls, processor: Any, cfg: DataConfig | None, train: bool) -> ImageTransform:
        size = processor.size.get("shortest_edge") or min(processor.size.values())
        crop = (processor.crop_size["height"], processor.crop_size["width"])
        if not train or cfg is None:
            return cls(size, crop)
        return cls(size, crop, cfg.random_crop, cfg.crop_scale_min, cfg.hflip)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        ch, cw = self.crop
        if self.random_crop:
            image = image.resize((cw, ch), Image.Resampling.BICUBIC, box=self._random_box(image.size, rng))
        else:
            w, h = image.size
            scale = self.size / min(w, h)
            w, h = max(cw, round(w * scale)), max(ch, round(h * scale))
            image = image.resize((w, h), Image.Resampling.BICUBIC)
            left, top = round((w - cw) / 2), round((h - ch) / 2)
            image = image.crop((left, top, left + cw, top + ch))
        if self.hflip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)

    def _random_box(self, size: tuple[int, int], rng: random.Random) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop box: area fraction in [scale_min, 1], aspect in [3/4, 4/3]."""
        w, h = size
        for _ in range(10):
            area = w * h * rng.uniform(self.scale_min, 1.0)
            aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
                return left, top, left + cw, top + ch
        side = min(w, h)
        return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side


class TrainEpoch(IterableDataset):
    """One epoch of one rank; each loader worker reads its own slot."""

    def __init__(
        self,
        shards: list[tuple[str, int]],
        layout: Layout,
        rank: int,
        epoch: int,
        start: int,
        cfg: DataConfig,
        seed: int,
        transform: ImageTransform,
        collate: Collate,
    ) -> None:
        super().__init__()
        self.shards, self.layout, self.rank, self.epoch, self.start = shards, layout, rank, epoch, start
        self.cfg, self.seed, self.transform, self.collate = cfg, seed, transform, collate

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        lay = self.layout
        # The DataLoader asks its worker 0 first; after a resume the next micro-batch, number `start`,
        # belongs to slot worker start % W, so loader workers are rotated onto slot workers.
        worker = ((info.id if info is not None else 0) + self.start) % lay.workers
        slot = self.rank * lay.workers + worker
        # Micro-batches i < start were trained already; slot worker w made those with i % W == w.
        done = max(0, -(-(self.start - worker) // lay.workers))
        ranges = _cut(self.shards, slot * lay.per_slot, (slot + 1) * lay.per_slot)
        rng = random.Random(derive_seed(self.seed, "shuffle", self.epoch, slot))
        prep = partial(preprocess, transform=self.transform, seed=self.seed, epoch=self.epoch, train=True)
        left = lay.batches_per_slot - done
        pipeline = wds.DataPipeline(
            partial(read_ranges, ranges),  # this slot's samples as raw bytes (webdataset's tar reader)
            partial(shuffle, bufsize=self.cfg.shuffle_buffer, rng=rng),  # seeded: replays exactly on resume
            partial(skip, count=done * lay.batch),  # trained before a resume: dropped before decoding, cheap
            decode_or_substitute,  # an undecodable sample is counted and replaced, never fatal here
            partial(map, prep),  # image → tensor; one of an image's captions, drawn per epoch
            partial(batched, size=lay.batch, count=left, collate=self.collate),  # the planned count, no more
        )
        return iter(pipeline)


class EvalData(IterableDataset):
    """The eval split, each sample exactly once across ranks and workers. Slots are padded with
    flagged repeats to equal length, so every rank runs the same number of forward passes (ZeRO-3
    gathers parameters in every forward; unequal counts would hang)."""

    def __init__(
        self,
        shards: list[tuple[str, int]],
        ranks: int,
        workers: int,
        rank: int,
        batch: int,
        transform: ImageTransform,
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
        self.transform, self.collate = transform, collate
        self.total = sum(n for _, n in shards)
        self.per_slot = -(-self.total // (self.ranks * self.workers))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        slot = self.rank * self.workers + (info.id if info is not None else 0)
        start = min(self.total, slot * self.per_slot)
        stop = min(self.total, start + self.per_slot)
        samples = decode_or_substitute(read_ranges(_cut(self.shards, start, stop)))
        samples = (
            preprocess(s, self.transform, 0, 0, train=False) | {"index": start + i}
            for i, s in enumerate(samples)
        )
        padded = _pad(samples, self.per_slot)
        count = -(-self.per_slot // self.batch)
        for _ in range(count):
            chunk = list(itertools.islice(padded, self.batch))
            if chunk:
                yield self.collate(chunk)

    def batches_per_rank(self) -> int:
        return self.workers * -(-self.per_slot // self.batch)


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


def shards_of(
    manifest: Manifest, split: str, seed: int, epoch: int, shuffle_shards: bool
) -> list[tuple[str, int]]:
    record = manifest.split(split)
    return epoch_shards(record.shards, manifest.root / split, seed, epoch, shuffle_shards)


class TrainData:
    """One rank's view of the data: the epoch plan, the train loader of an epoch, the eval loader."""

    def __init__(
        self,
        cfg: DataConfig,
        manifest: Manifest,
        rank: int,
        ranks: int,
        batch: int,
        accum: int,
        seed: int,
        collate: Collate,
        processor: Any,
        pin: bool,
    ) -> None:
        self.cfg, self.manifest, self.rank, self.ranks, self.seed, self.pin = (
            cfg,
            manifest,
            rank,
            ranks,
            seed,
            pin,
        )
        self.collate = collate
        train = manifest.split(cfg.train_split)
        manifest.split(cfg.eval_split)  # a missing eval split is an error now, not after an epoch
        self.layout = train_layout(
            train.num_samples, ranks, cfg.workers, batch, cfg.train_split, manifest.root / "manifest.json"
        )
        self.accum = accum
        self.steps_per_epoch = self.layout.micro_batches // accum
        if self.steps_per_epoch == 0:
            raise UserError(
                f"an epoch gives each rank {self.layout.micro_batches} micro-batches, fewer than train.grad_accum={accum}: "
                "lower grad_accum or the batch size"
            )
        self.image_mean, self.image_std = list(processor.image_mean), list(processor.image_std)
        self.train_transform = ImageTransform.of(processor, cfg, train=True)
        self.eval_transform = ImageTransform.of(processor, cfg, train=False)

    @classmethod
    def of(
        cls, cfg: Any, manifest: Manifest, info: Any, collate: Collate, processor: Any, device: str
    ) -> TrainData:
        """From a TrainConfig and the launch (DistInfo)."""
        t = cfg.train
        return cls(
            cfg.data,
            manifest,
            info.rank,
            info.world_size,
            t.batch_size,
            t.grad_accum,
            cfg.run.seed,
            collate,
            processor,
            device.startswith("cuda"),
        )

    @property
    def micro_per_epoch(self) -> int:
        return self.steps_per_epoch * self.accum

    def epoch(self, epoch: int, start: int) -> Iterator[dict[str, Any]]:
        """The micro-batches of `epoch` from number `start` on (those before were trained already)."""
        shards = shards_of(self.manifest, self.cfg.train_split, self.seed, epoch, self.cfg.shuffle_shards)
        dataset = TrainEpoch(
            shards,
            self.layout,
            self.rank,
            epoch,
            start,
            self.cfg,
            self.seed,
            self.train_transform,
            self.collate,
        )
        batches = iter(loader(dataset, self.cfg.workers, self.pin))
        return itertools.islice(batches, max(0, self.micro_per_epoch - start))

    def eval_loader(self, batch: int) -> DataLoader:
        shards = shards_of(self.manifest, self.cfg.eval_split, 0, 0, shuffle_shards=False)
        dataset = EvalData(
            shards, self.ranks, self.cfg.workers, self.rank, batch, self.eval_transform, self.collate
        )
        return loader(dataset, self.cfg.workers, self.pin)
