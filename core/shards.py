"""A manifest's shards as ranges of samples: the one reader every stage uses.

Samples are addressed by their place in the concatenation of a split's shards (in manifest order,
or in a seeded per-epoch order), so a reader can take any contiguous slice of a split without
opening the tars before it. Reading is webdataset's own tar reader; decoding uses only the handlers
the harness needs (image, txt, json, cls) and never unpickles anything.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from core.manifest import Manifest
from core.remote import open_shard
from core.secrets import redact
from plumbing.errors import LocalError
from plumbing.seeds import derive_seed

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # img2dataset writes jpg, png or webp


@dataclass(frozen=True)
class Range:
    """Samples [start, stop) of one shard; `sha256` (the whole shard's, from the manifest) is set when the
    range reads the shard to its end and the shard is to be checked on the way."""

    path: str
    start: int
    stop: int
    sha256: str = ""


Shard = tuple[str, int, str]  # path, sample count, sha256 ("" when not checked)


def cut(shards: list[Shard] | list[tuple[str, int]], start: int, stop: int) -> list[Range]:
    """The shard ranges that hold samples [start, stop) of the concatenation of `shards`."""
    ranges, offset = [], 0
    for path, count, *sha in shards:
        lo, hi = max(start, offset), min(stop, offset + count)
        if lo < hi:
            whole = hi == offset + count  # reads through to the shard's end: can check all its bytes
            ranges.append(Range(path, lo - offset, hi - offset, sha[0] if sha and whole else ""))
        offset += count
    return ranges


def split_shards(
    manifest: Manifest, split: str, seed: int = 0, epoch: int = 0, shuffle: bool = False, verify: bool = False
) -> list[Shard]:
    """(path, sample count, sha256 if `verify`) of every shard of `split`: in manifest order, or in a
    seeded per-epoch order."""
    order = list(manifest.split(split).shards)
    if shuffle:
        random.Random(derive_seed(seed, "shards", epoch)).shuffle(order)
    return [(manifest.shard_location(split, s), s.num_samples, s.sha256 if verify else "") for s in order]


class HashingReader:
    """A file read through sha256, as tarfile reads it (sequentially); `size` counts the bytes."""

    def __init__(self, f: Any) -> None:
        self.f, self.h, self.size = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.h.update(data)
        self.size += len(data)
        return data

    def finish(self) -> str:
        while self.read(1 << 20):  # the end-of-archive blocks the tar reader never asks for
            pass
        return self.h.hexdigest()


def read_ranges(ranges: list[Range]) -> Iterator[dict[str, Any]]:
    """Raw samples (bytes per extension, `__key__`, `__url__`) of the ranges, in order, read with
    webdataset's own tar reader. A range with a `sha256` hashes the shard as it streams and compares at
    its end: a shard changed since data_prep wrote it stops the reader with one line naming it (this
    replaces hashing every shard before step 1, which for a large set outlasts the process group's
    timeout). A shard at a URL or behind a `pipe:` command streams through core.remote, which resumes a
    dropped connection at the byte reached: the tar reader and the hash see every byte once."""
    import webdataset as wds  # here, not at the top: data_prep imports this module and needs no torch

    for r in ranges:
        with open_shard(r.path) as f:
            stream = HashingReader(f) if r.sha256 else f
            files = wds.tariterators.tar_file_expander(iter([{"url": r.path, "stream": stream}]))
            yield from itertools.islice(wds.tariterators.group_by_keys(files), r.start, r.stop)
            if isinstance(stream, HashingReader) and stream.finish() != r.sha256:
                raise LocalError(
                    f"shard {redact(r.path)}: sha256 does not match the manifest (corrupted or replaced?)"
                )


def read_split(manifest: Manifest, split: str) -> Iterator[dict[str, Any]]:
    """Every raw sample of `split`, in manifest order."""
    yield from read_ranges([Range(path, 0, count) for path, count, _ in split_shards(manifest, split)])


def image_bytes(sample: dict[str, Any]) -> bytes | None:
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


_SCAN = json.JSONDecoder().scan_once  # the C scanner json.loads ends in, without its Python layers


def json_member(data: bytes) -> Any:
    """`json.loads(data)`, exactly, at a third of its cost for a sample's small json member: the C
    scanner on its UTF-8 text; anything it does not take whole (a BOM, UTF-16, whitespace around the
    value, bad JSON) goes to json.loads itself, for its value or its error."""
    try:
        text = data.decode("utf-8", "surrogatepass")
        value, end = _SCAN(text, 0)
        if end == len(text):
            return value
    except (StopIteration, ValueError, UnicodeDecodeError):
        pass
    return json.loads(data)


def captions_of(sample: dict[str, Any]) -> list[str]:
    """All captions of a raw sample: its json's "captions" (Flickr8k), else its txt (CIFAR-10 prompts).
    Raises ValueError (or UnicodeDecodeError) on a json or txt member that does not decode."""
    meta = json_member(sample["json"]) if "json" in sample else None
    return caption_list(meta, sample["txt"].decode("utf-8") if "txt" in sample else None)


def caption_list(meta: Any, text: str | None) -> list[str]:
    """A sample's captions from its decoded json and txt: the json object's "captions" when they are a
    non-empty list of strings (one string is one caption), else the txt. A json that is not an object
    (a list, a number: a user's own shards hold anything) or "captions" of other types name no caption."""
    found = meta.get("captions") if isinstance(meta, dict) else None
    if isinstance(found, str):
        found = [found]
    if isinstance(found, list) and found and all(isinstance(c, str) for c in found):
        return list(found)
    return [text] if text is not None else []


def rgb_or_none(source: bytes | str | Path) -> Image.Image | None:
    """An image's bytes or file, decoded to RGB; None when it cannot be read (truncated, not an image,
    a decompression bomb): the caller counts it as skipped."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw sample → key, image, its encoded bytes, and label / meta / text when present. Raises on a
    bad sample. The image is opened, not yet decoded (its header read, its pixels not): the consumer
    may ask for a reduced size first (Pillow's Image.draft: a JPEG decoded at 1/2, 1/4 or 1/8 scale
    by libjpeg's DCT scaling) and decodes it with `rgb`; undecodable pixels raise there."""
    data = image_bytes(sample)
    if data is None:
        raise ValueError("no image member")
    image = Image.open(io.BytesIO(data))
    out: dict[str, Any] = {"key": sample["__key__"], "image": image, "encoded": data}
    if "cls" in sample:
        out["label"] = int(sample["cls"])
    if "json" in sample:
        out["meta"] = json_member(sample["json"])
    if "txt" in sample:
        out["text"] = sample["txt"].decode("utf-8")
    return out


def rgb(image: Image.Image) -> Image.Image:
    """The image decoded, in RGB (an RGB image as it is: `convert` would copy every pixel)."""
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")
