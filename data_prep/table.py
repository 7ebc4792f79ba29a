"""Read an image–caption table the way open_clip's CsvDataset does: `.csv`/`.tsv` (tab-separated by
default, columns `filepath` and `title`, all settable) or `.jsonl` (one object per line).

open_clip (training/data.py) reads it with `pd.read_csv(file, sep=separator)`: a header row, then one
row per (image, caption) pair, quoted fields as the csv module quotes them. Here several rows of one
image become one sample with all its captions (the trainer draws one per epoch); relative paths
resolve against the table's folder (`../` included: it is the user's own table); an optional split
column names each image's split, else the hash split. A bad row is skipped and listed, never fatal;
a table without the named columns is one line naming them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep.images import ImageRef, Resize
from data_prep.samples import (
    BAD_ROW,
    BAD_SPLIT,
    EMPTY_CAPTION,
    SPLIT_CONFLICT,
    ImageText,
    clean_caption,
    hash_split,
    split_name_problem,
    unique_keys,
)
from data_prep.shards import SplitPlan, describe_source, rejection
from plumbing.errors import UserError

JSONL = (".jsonl", ".json")
_OTHER_SEPARATORS = {",": "','", "\t": "\\t", ";": "';'", "|": "'|'"}


@dataclass(frozen=True)
class Row:
    line: int
    image: str
    captions: tuple[str, ...]
    split: str


@dataclass
class Table:
    splits: dict[str, SplitPlan]
    rejected: list[dict[str, str]]
    split_source: str
    sources: dict[str, Any]


def read_table(
    path: Path,
    image_key: str,
    caption_key: str,
    separator: str,
    split_key: str,
    resize: Resize,
    image_root: Path | None = None,
) -> Table:
    """The table's images, one sample each with all their captions, in splits; relative image paths
    resolve against `image_root`, else the table's folder."""
    if not path.is_file():
        raise UserError(
            f"{path}: no such file (expected a .csv, .tsv or .jsonl table of images and captions)"
        )
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    keys = (image_key, caption_key, split_key)
    reader = _jsonl_rows if path.suffix.lower() in JSONL else _delimited_rows
    rows, rejected = reader(path, text, keys, separator)
    folder = image_root or path.parent
    if not folder.is_dir():
        raise UserError(
            f"{folder}: no such folder (--image-root: where the table's relative image paths start)"
        )
    grouped, more = _group(rows, path, folder, bool(split_key))
    rejected += more
    # An image under the folder is its path less the folder's (what relpath returns, at a tenth of
    # its cost: each of N tasks plans the whole table); relpath for the others (../, elsewhere).
    prefix = os.path.join(os.path.normpath(folder), "")
    relative = {
        image: image[len(prefix) :] if image.startswith(prefix) else os.path.relpath(image, folder)
        for image in grouped
    }
    if split_key:
        by_split: dict[str, list[str]] = {}
        for image, (_, _, split) in grouped.items():
            by_split.setdefault(split, []).append(image)
        split_source = f"column {split_key!r} of {path.name}"
    else:
        names = {relative[image]: image for image in grouped}
        by_split = {s: [names[n] for n in ns] for s, ns in hash_split(list(names)).items()}
        split_source = "hash of the image path"
    ordered = [image for images in by_split.values() for image in images]
    key_of = dict(zip(ordered, unique_keys([relative[i] for i in ordered])))
    splits: dict[str, SplitPlan] = {}
    for split, images in by_split.items():
        plan = SplitPlan([])
        for image in images:
            captions, _, _ = grouped[image]
            ref = ImageRef("", image)
            plan.samples.append(
                ImageText(
                    key_of[image], relative[image], ref, tuple(captions), relative[image], split, resize
                )
            )
        splits[split] = plan
    return Table(splits, rejected, split_source, {"table": asdict(describe_source(path, ("sha256",)))})


def _group(
    rows: list[Row], path: Path, folder: Path, by_column: bool
) -> tuple[dict[str, tuple[list[str], int, str]], list[dict[str, str]]]:
    """Resolved image path → (captions in row order, first line, split); rows that disagree on an
    image's split are rejected (the image stays in its first row's split)."""
    grouped: dict[str, tuple[list[str], int, str]] = {}
    rejected = []
    for row in rows:
        image = os.path.normpath(os.path.join(folder, row.image))
        if image not in grouped:
            grouped[image] = ([], row.line, row.split)
        captions, first, split = grouped[image]
        if by_column and row.split != split:
            rejected.append(
                rejection(
                    f"{path.name}:{row.line}",
                    SPLIT_CONFLICT,
                    f"{row.image} is in split {split!r} on line {first}, not {row.split!r}",
                )
            )
            continue
        captions.extend(c for c in row.captions if c not in captions)
    return grouped, rejected


def _row(
    path: Path, line: int, fields: dict[str, Any], keys: tuple[str, str, str]
) -> tuple[Row | None, dict[str, str] | None]:
    """One row checked: a Row, or why it is skipped."""
    image_key, caption_key, split_key = keys
    item = f"{path.name}:{line}"
    image, caption = fields.get(image_key), fields.get(caption_key)
    if image is None or caption is None or (split_key and fields.get(split_key) is None):
        return None, rejection(item, BAD_ROW, "fewer fields than the header")
    image = str(image).strip()
    if not image:
        return None, rejection(item, BAD_ROW, f"empty {image_key}")
    if "://" in image:
        return None, rejection(
            item, BAD_ROW, f"{image[:60]} is a URL: download with img2dataset, then `data_prep index`"
        )
    texts = [clean_caption(c) for c in caption] if isinstance(caption, list) else [clean_caption(caption)]
    texts = [t for t in texts if t]
    if not texts:
        return None, rejection(item, EMPTY_CAPTION, f"empty {caption_key} for {image}")
    split = str(fields.get(split_key, "")).strip() if split_key else ""
    problem = split_name_problem(split) if split_key else None
    if problem:
        return None, rejection(item, BAD_SPLIT, problem)
    return Row(line, image, tuple(texts), split), None


def _delimited_rows(
    path: Path, text: str, keys: tuple[str, str, str], separator: str
) -> tuple[list[Row], list[dict[str, str]]]:
    reader = csv.reader(io.StringIO(text), delimiter=separator)
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise UserError(f"{path}: empty file (expected a header row, e.g. filepath<TAB>title)") from None
    except csv.Error as err:
        raise UserError(f"{path}:1: unreadable header ({err})") from None
    for key, flag in zip(keys, ("--image-key", "--caption-key", "--split-key")):
        if key and key not in header:
            raise UserError(_missing_column(path, key, flag, header, text, separator))
    rows, rejected = [], []
    while True:
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            rejected.append(rejection(f"{path.name}:{reader.line_num}", BAD_ROW, f"unreadable row ({err})"))
            continue
        if not any(v.strip() for v in values):
            continue
        row, why = _row(path, reader.line_num, dict(zip(header, values)), keys)
        rows += [row] if row else []
        rejected += [why] if why else []
    if not rows and not rejected:
        raise UserError(f"{path}: holds a header and no rows")
    return rows, rejected


def _missing_column(path: Path, key: str, flag: str, header: list[str], text: str, separator: str) -> str:
    first = text.splitlines()[0] if text.strip() else ""
    hint = ""
    for other, written in _OTHER_SEPARATORS.items():
        if other != separator and key in [h.strip().strip('"') for h in first.split(other)]:
            hint = f"; the header looks {'TAB' if other == chr(9) else repr(other)}-separated: add --separator {written}"
            break
    shown = ", ".join(repr(h) for h in header[:12]) if len(header) > 1 else repr(first[:80])
    return f"{path}: no column {key!r} ({flag}); the header has {shown}{hint}"


def _jsonl_rows(
    path: Path, text: str, keys: tuple[str, str, str], separator: str
) -> tuple[list[Row], list[dict[str, str]]]:
    del separator  # JSON lines have no separator
    rows, rejected = [], []
    for line, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            fields = json.loads(raw)
        except json.JSONDecodeError as err:
            rejected.append(rejection(f"{path.name}:{line}", BAD_ROW, f"not a JSON object ({err})"))
            continue
        if not isinstance(fields, dict):
            rejected.append(rejection(f"{path.name}:{line}", BAD_ROW, "not a JSON object"))
            continue
        if not rows and not rejected:
            for key, flag in zip(keys, ("--image-key", "--caption-key", "--split-key")):
                if key and key not in fields:
                    raise UserError(
                        f"{path}:{line}: no key {key!r} ({flag}); the first object has {', '.join(map(repr, fields))}"
                    )
        row, why = _row(path, line, fields, keys)
        rows += [row] if row else []
        rejected += [why] if why else []
    if not rows and not rejected:
        raise UserError(f"{path}: holds no rows")
    return rows, rejected
