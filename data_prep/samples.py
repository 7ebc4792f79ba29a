"""What every image–text source hands the writer: one `ImageText` per image, with all its captions.

A source (coco.py, table.py, folder.py, flickr8k.py) only finds images and captions and decides the
splits; reading, checking, resizing and writing happen here and in shards.py, the same for all.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

from data_prep.images import KEEP, ImageSource, Resize, prepare_image

# Without a split of the source's own: a split from a hash of the image's name, stable when images
# are added or removed (the documented split Flickr8k's Kaggle layout already uses).
HASH_SPLIT = (("train", 750), ("dev", 875), ("test", 1000))  # cumulative per-mille
_SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_UNSAFE_KEY = re.compile(r"[^A-Za-z0-9_-]+")

# Rejection kinds of rows and captions (images.py has the image ones).
EMPTY_CAPTION = "empty caption"
NO_CAPTION = "no caption"
UNSAFE_PATH = "unsafe path"
BAD_SPLIT = "bad split name"
SPLIT_CONFLICT = "split conflict"
BAD_ROW = "bad row"


@dataclass(frozen=True)
class ImageText:
    """One image and its captions, built into WebDataset members inside a shard-writing worker:
    the image (`jpg`, `png` or `webp`), the first caption as `txt` (what open_clip reads), and `json`
    with every caption (what the trainer draws from) and where the image came from."""

    key: str
    item: str  # what a rejection calls it: the image's path as the source names it
    ref: ImageSource
    captions: tuple[str, ...]
    image: str  # the json's "image": the name the source gives it
    split: str
    resize: Resize = KEEP
    full_decode: bool = False
    extra: tuple[tuple[str, object], ...] = ()  # more json fields (COCO's image_id)

    def members(self) -> dict[str, bytes]:
        ext, data = prepare_image(self.ref.read(), self.resize, self.full_decode)
        # Built here, in the worker, for this task's samples only (every task plans every sample).
        meta = {"image": self.image, "split": self.split, "captions": list(self.captions), **dict(self.extra)}
        return {
            ext: data,
            "txt": self.captions[0].encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }


def clean_caption(text: object) -> str:
    """A caption on one line: COCO's carry leading/trailing spaces and newlines."""
    return " ".join(str(text).split()) if text is not None else ""


def split_name_problem(name: str) -> str | None:
    """Why `name` cannot name a split (it becomes a folder under --out), or None."""
    if _SPLIT_NAME.fullmatch(name):
        return None
    return f"split {name[:40]!r} is not a name of letters, digits, '_' and '-'"


def sample_key(name: str) -> str:
    """WebDataset splits a key at its first dot, so the key is the name without extension and dots."""
    stem = name.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    return stem.replace(".", "_")


def unique_keys(paths: list[str]) -> list[str]:
    """Keys for images named by relative paths (`cats/a.b.jpg` → `cats_a_b`): only letters, digits,
    '_' and '-' (a WebDataset key ends at its first dot, a '/' would make tar folders); a key taken
    already gets `_2`, `_3`, … in order, so the same list always gives the same keys."""
    keys, taken = [], set()
    for path in paths:
        stem = path.rsplit(".", 1)[0] if "." in path.rsplit("/", 1)[-1][1:] else path
        base = _UNSAFE_KEY.sub("_", stem).strip("_") or "image"
        key, n = base, 1
        while key in taken:
            n += 1
            key = f"{base}_{n}"
        taken.add(key)
        keys.append(key)
    return keys


def hash_split(names: list[str]) -> dict[str, list[str]]:
    """The documented split used when a source has none: sha1(name) per mille → 75/12.5/12.5 %."""
    splits: dict[str, list[str]] = {s: [] for s, _ in HASH_SPLIT}
    for name in sorted(names):
        bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 1000
        splits[next(s for s, limit in HASH_SPLIT if bucket < limit)].append(name)
    return splits
