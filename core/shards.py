"""A manifest's shards as ranges of samples: the one reader every stage uses.

Samples are addressed by their place in the concatenation of a split's shards (in manifest order,
or in a seeded per-epoch order), so a reader can take any contiguous slice of a split without
opening the tars before it. Reading is webdataset's own tar reader; decoding uses only the handlers
the harness needs (image, txt, json, cls) and never unpickles anything.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from PIL import Image

from core.manifest import Manifest
from plumbing.seeds import derive_seed

IMAGE_KEYS = ("jpg", "jpeg", "png")


@dataclass(frozen=True)
class Range:
    """Samples [start, stop) of one shard."""

    path: str
    start: int
    stop: int


def cut(shards: list[tuple[str, int]], start: int, stop: int) -> list[Range]:
    """The shard ranges that hold samples [start, stop) of the concatenation of `shards`."""
    ranges, offset = [], 0
    for path, count in shards:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            ranges.append(Range(path, lo - offset, hi - offset))
        offset += count
    return ranges


def split_shards(
    manifest: Manifest, split: str, seed: int = 0, epoch: int = 0, shuffle: bool = False
) -> list[tuple[str, int]]:
    """(path, sample count) of every shard of `split`: in manifest order, or in a seeded per-epoch order."""
    order = list(manifest.split(split).shards)
    if shuffle:
        random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    return [(str(manifest.root / split / s.name), s.num_samples) for s in order]


def read_ranges(ranges: list[Range]) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per extension, `__key__`, `__url__`) of the ranges, in order."""
    for r in ranges:
        samples = wds.tariterators.tarfile_samples(iter([{"url": r.path}]))
        yield from itertools.islice(samples, r.start, r.stop)


def read_split(manifest: Manifest, split: str) -> Iterator[dict[str, Any]]:
    """Every raw sample of `split`, in manifest order."""
    shards = split_shards(manifest, split)
    yield from read_ranges([Range(path, 0, count) for path, count in shards])


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


def captions_of(sample: dict[str, Any]) -> list[str]:
    """All captions of a raw sample: its json's "captions" (Flickr8k), else its txt (CIFAR-10 prompts)."""
    meta = json.loads(sample["json"]) if "json" in sample else {}
    if meta.get("captions"):
        return list(meta["captions"])
    return [sample["txt"].decode("utf-8")] if "txt" in sample else []


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw sample → key, RGB image, and label / meta / text when present. Raises on a bad sample."""
    data = image_bytes(sample)
    if data is None:
        raise ValueError("no image member")
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
    out: dict[str, Any] = {"key": sample["__key__"], "image": image}
    if "cls" in sample:
        out["label"] = int(sample["cls"])
    if "json" in sample:
        out["meta"] = json.loads(sample["json"])
    if "txt" in sample:
        out["text"] = sample["txt"].decode("utf-8")
    return out
