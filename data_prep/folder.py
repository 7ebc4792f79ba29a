"""Read an image folder the way Hugging Face's `imagefolder` builder does (what diffusers'
train_text_to_image.py and transformers' run_clip.py load with `load_dataset("imagefolder", …)`).

Layout (datasets' folder_based_builder and data_files.py): images anywhere under the folder; a
`metadata.jsonl` or `metadata.csv` whose `file_name` column is an image path relative to the metadata
file's own folder, and whose other columns are features (here the caption column, `text` by default,
a string or a list of strings). Top-level sub-folders named by datasets' split keywords are splits:
train/training → train, validation/valid/dev/val → validation, test/testing/eval/evaluation → test.
Without them, the hash split. An image without a metadata row, a row without its image, a path that
leaves the folder: skipped and listed.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep.images import MISSING, ImageRef, Resize
from data_prep.samples import (
    BAD_ROW,
    BAD_SPLIT,
    EMPTY_CAPTION,
    NO_CAPTION,
    UNSAFE_PATH,
    ImageText,
    clean_caption,
    hash_split,
    unique_keys,
)
from data_prep.shards import SplitPlan, folder_info, rejection
from plumbing.errors import UserError

METADATA = ("metadata.jsonl", "metadata.csv")
SPLIT_FOLDERS = {
    **dict.fromkeys(("train", "training"), "train"),
    **dict.fromkeys(("validation", "valid", "dev", "val"), "validation"),
    **dict.fromkeys(("test", "testing", "eval", "evaluation"), "test"),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass
class FolderSource:
    splits: dict[str, SplitPlan]
    rejected: list[dict[str, str]]
    split_source: str
    sources: dict[str, Any]


def read_folder(root: Path, caption_key: str, resize: Resize) -> FolderSource:
    """Every captioned image under `root`, one sample each with all its captions, in splits."""
    if not root.is_dir():
        raise UserError(
            f"{root}: no such folder (expected an imagefolder with metadata.jsonl or metadata.csv)"
        )
    images, metadata = _walk(root)
    if not metadata:
        raise UserError(
            f"{root}: no metadata.jsonl or metadata.csv (imagefolder needs one, with a file_name column and a "
            f"caption column, {caption_key!r} by default)"
        )
    captions: dict[str, list[str]] = {}
    rejected: list[dict[str, str]] = []
    for folder, name in metadata:
        for item, file_name, caption in _rows(root, folder, name, caption_key, rejected):
            path = posixpath.normpath(posixpath.join(folder, file_name)) if file_name else ""
            if not file_name or posixpath.isabs(file_name) or path == ".." or path.startswith("../"):
                rejected.append(
                    rejection(item, UNSAFE_PATH, f"file_name {file_name!r} is not a path inside {root}")
                )
            elif path not in images:
                rejected.append(rejection(item, MISSING, f"no such image {root / path}"))
            elif not caption:
                rejected.append(rejection(item, EMPTY_CAPTION, f"empty {caption_key} for {path}"))
            else:
                captions.setdefault(path, []).extend(c for c in caption if c not in captions.get(path, []))
    rejected += [
        rejection(p, NO_CAPTION, "an image no metadata row names")
        for p in sorted(set(images) - set(captions))
    ]
    by_split, split_source = _splits(sorted(captions), rejected)
    ordered = [p for paths in by_split.values() for p in paths]
    key_of = dict(zip(ordered, unique_keys(ordered)))
    splits = {}
    for split, paths in by_split.items():
        samples = [
            ImageText(
                key_of[p],
                p,
                ImageRef("", images[p]),
                tuple(captions[p]),
                p,
                split,
                resize,
            )
            for p in paths
        ]
        splits[split] = SplitPlan(samples)
    # The listing of what was read (images and metadata), not of the whole folder: an --out inside it
    # must not change the source's identity.
    listed = [(p, os.stat(a).st_size) for p, a in images.items()]
    listed += [(posixpath.join(f, n), (root / f / n).stat().st_size) for f, n in metadata]
    return FolderSource(splits, rejected, split_source, {"folder": asdict(folder_info(root, sorted(listed)))})


def _walk(root: Path) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Images (relative posix path → absolute path) and metadata files ((folder, name), in order)
    under `root`, hidden files and folders left out; links to folders are not followed."""
    images: dict[str, str] = {}
    metadata: list[tuple[str, str]] = []
    base = root.resolve()
    for folder, dirs, files in os.walk(base):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(base).as_posix()
        rel = "" if rel == "." else rel
        found = [n for n in METADATA if n in files]
        if len(found) == 2:
            raise UserError(f"{Path(folder)}: has both metadata.jsonl and metadata.csv: keep one")
        metadata += [(rel, found[0])] if found else []
        for name in sorted(files):
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                images[posixpath.join(rel, name)] = os.path.join(folder, name)
    return images, metadata


def _rows(
    root: Path, folder: str, name: str, caption_key: str, rejected: list[dict[str, str]]
) -> list[tuple[str, str, list[str]]]:
    """(item, file_name, captions) of one metadata file; a file without the columns is one line."""
    path = root / folder / name
    where = f"{folder}/{name}" if folder else name
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    records: list[tuple[int, Any]] = []
    if name.endswith(".jsonl"):
        for line, raw in enumerate(text.splitlines(), 1):
            if raw.strip():
                try:
                    records.append((line, json.loads(raw)))
                except json.JSONDecodeError as err:
                    rejected.append(rejection(f"{where}:{line}", BAD_ROW, f"not a JSON object ({err})"))
    else:
        reader = csv.DictReader(
            io.StringIO(text)
        )  # datasets reads metadata.csv with pandas' defaults: commas
        records = [(reader.line_num, row) for row in reader]
    good = [(line, r) for line, r in records if isinstance(r, dict)]
    rejected += [
        rejection(f"{where}:{line}", BAD_ROW, "not a JSON object")
        for line, r in records
        if not isinstance(r, dict)
    ]
    if good:
        first = good[0][1]
        for key, flag in (("file_name", "imagefolder's own column"), (caption_key, "--caption-key")):
            if key not in first:
                raise UserError(f"{path}: no column {key!r} ({flag}); it has {', '.join(map(repr, first))}")
    out = []
    for line, r in good:
        caption = r.get(caption_key)
        texts = [clean_caption(c) for c in caption] if isinstance(caption, list) else [clean_caption(caption)]
        out.append((f"{where}:{line}", str(r.get("file_name") or "").strip(), [t for t in texts if t]))
    return out


def _splits(paths: list[str], rejected: list[dict[str, str]]) -> tuple[dict[str, list[str]], str]:
    """Split sub-folders when there are any (images outside them are listed, not guessed), else the
    hash split of the image paths."""
    named = {p: SPLIT_FOLDERS.get(p.split("/", 1)[0]) if "/" in p else None for p in paths}
    if not any(named.values()):
        return hash_split(paths), "hash of the image path"
    splits: dict[str, list[str]] = {}
    for split in ("train", "validation", "test"):
        chosen = [p for p in paths if named[p] == split]
        if chosen:
            splits[split] = chosen
    for p in paths:
        if named[p] is None:
            rejected.append(rejection(p, BAD_SPLIT, "outside the train/, validation/, test/ folders"))
    return splits, "split folders"
