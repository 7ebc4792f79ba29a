"""Prompt files by kind: each reader turns one file into rows, which sampler.prompts makes into items.

The kind comes from the name and is checked against the content:

    .txt                  a prompt per line; a first line with tabs is refused (a table is a .tsv)
    .jsonl                an object per line: "prompt" and options
    .csv / .tsv           a header row; the prompt column by name, every other column kept as metadata
    .json                 COCO captions (`annotations/captions_val2017.json`): one item per image
    manifest.json:SPLIT   a data_prep split: one item per sample, its key and captions kept, and its
                          real image known (the summary compares each picture with it)

A .csv is RFC 4180 (quoted fields may hold commas, quotes and newlines). A .tsv is IANA
text/tab-separated-values: no quoting at all, so PartiPrompts' `"G I G G L E" painted …` keeps its
quotes (the csv module's default dialect would strip them). Both may start with a UTF-8 byte order
mark, as Excel writes them.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.manifest import load_manifest, verify_shards
from core.shards import captions_of, read_split
from plumbing.errors import UserError
from plumbing.files import safe_name

KINDS = ".txt, .jsonl, .csv, .tsv, a COCO captions .json, or a data_prep manifest.json:SPLIT"
PROMPT_COLUMNS = ("prompt", "prompts", "text", "caption")  # in this order; any case (Prompt, Prompts…)


@dataclass(frozen=True)
class Source:
    """One prompt file; `split` is set for a data_prep manifest (`manifest.json:test`)."""

    path: Path
    split: str = ""

    def __str__(self) -> str:
        return f"{self.path}:{self.split}" if self.split else str(self.path)


@dataclass(frozen=True)
class Reference:
    """The real image a prompt describes: a sample of a prepared split."""

    manifest: str
    split: str
    key: str


@dataclass(frozen=True)
class Options:
    prompt_column: str = ""  # "" : the first of PROMPT_COLUMNS in the header
    all_captions: bool = False  # COCO and manifests: an item per caption, not per image


@dataclass(frozen=True)
class Row:
    """What a reader found at one place of a file, before sampler.prompts checks it."""

    where: str  # file:line, or the image / sample it is, for messages and the record's "source"
    number: int  # the line or row number an automatic id is made from
    record: dict[str, Any]  # "prompt", options (.jsonl), and "id" where the kind fixes it
    meta: dict[str, Any] = field(default_factory=dict)
    real: Reference | None = None
    error: str = ""  # why the row is unusable: fatal, or skipped with skip_bad_lines


def rows(source: Source, options: Options) -> Iterator[Row]:
    if source.split:
        return _manifest(source, options)
    readers = {".txt": _txt, ".jsonl": _jsonl, ".csv": _table, ".tsv": _table, ".json": _coco}
    reader = readers.get(source.path.suffix.lower())
    if reader is None:
        raise UserError(f"{source.path}: cannot tell what kind of prompt file this is: expected {KINDS}")
    return reader(source, options)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read prompts ({err})") from None


def _txt(source: Source, options: Options) -> Iterator[Row]:
    path, first = source.path, True
    for number, line in enumerate(_text(path).splitlines(), 1):
        prompt = line.strip()
        if not prompt or prompt.startswith("#"):
            continue
        if first and "\t" in line:
            raise UserError(_tabs(path, number, line))
        first = False
        yield Row(f"{path}:{number}", number, {"prompt": prompt})


def _tabs(path: Path, number: int, line: str) -> str:
    fields = [f.strip() for f in line.split("\t")]
    if any(f.lower() in PROMPT_COLUMNS for f in fields) or all(f and " " not in f for f in fields):
        return (
            f"{path}:{number}: looks like the header of a tab-separated table ({' | '.join(fields)}); "
            "a .txt holds one prompt per line: name the file .tsv to read it as a table"
        )
    return (
        f"{path}:{number}: holds a tab; a .txt holds one prompt per line: "
        "a table belongs in a .tsv with a header row"
    )


def _jsonl(source: Source, options: Options) -> Iterator[Row]:
    path = source.path
    for number, line in enumerate(_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError as err:
            yield Row(where, number, {}, error=f"not valid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(record, dict):
            yield Row(where, number, {}, error='expected a JSON object with a "prompt"')
            continue
        yield Row(where, number, record)


def _table(source: Source, options: Options) -> Iterator[Row]:
    path = source.path
    tsv = path.suffix.lower() == ".tsv"
    dialect: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {"delimiter": ","}
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            table = list(_numbered(csv.reader(f, strict=True, **dialect), path, "TSV" if tsv else "CSV"))
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read prompts ({err})") from None
    if not table:
        return
    header_line, header = table[0]
    names = [name.strip() for name in header]
    column = _prompt_column(path, header_line, names, options.prompt_column)
    for number, (line, values) in enumerate(table[1:], 1):
        where = f"{path}:{line}"
        if len(values) != len(names):
            yield Row(where, number, {}, error=f"{len(values)} fields, the header has {len(names)}")
            continue
        meta = {name: value for i, (name, value) in enumerate(zip(names, values)) if i != column}
        yield Row(where, number, {"prompt": values[column]}, meta)


def _numbered(reader: Any, path: Path, kind: str) -> Iterator[tuple[int, list[str]]]:
    """(the line a row starts on, its fields) of every non-blank row; broken quoting is one line."""
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise UserError(f"{path}:{reader.line_num}: not a valid {kind} line ({err})") from None
        if values:
            yield start, values


def _prompt_column(path: Path, line: int, names: list[str], wanted: str) -> int:
    if wanted:
        if wanted not in names:
            raise UserError(
                f"{path}:{line}: no column {wanted!r} (prompt_column) in the header: {', '.join(names)}"
            )
        return names.index(wanted)
    lowered = [name.lower() for name in names]
    for candidate in PROMPT_COLUMNS:
        if candidate in lowered:
            return lowered.index(candidate)
    raise UserError(
        f"{path}:{line}: no prompt column in the header ({', '.join(names)}): a .csv/.tsv starts with a "
        "header row naming a column prompt, Prompt, Prompts, text or caption (or set prompt_column=NAME)"
    )


# --------------------------------------------------------------------------- COCO captions

COCO = '{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}'


def _coco(source: Source, options: Options) -> Iterator[Row]:
    """COCO captions (cocodataset.org/#format-data, "Image Captioning"): one item per image with its
    first caption in file order (pycocotools' `imgToAnns` keeps that order), or one per caption."""
    path = source.path
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    if isinstance(data, dict) and "splits" in data and "format_version" in data:
        raise UserError(
            f"{path}: a data_prep manifest: name a split, e.g. {path}:test (it has {', '.join(data['splits'])})"
        )
    if not (
        isinstance(data, dict)
        and isinstance(data.get("images"), list)
        and isinstance(data.get("annotations"), list)
    ):
        raise UserError(
            f"{path}: not a COCO captions file: expected {COCO} (or name a .txt, .jsonl, .csv, .tsv)"
        )
    images: dict[Any, dict[str, Any]] = {}
    for i, image in enumerate(data["images"]):
        if not isinstance(image, dict) or not _is_id(image.get("id")):
            raise UserError(f'{path}: images[{i}]: expected an object with an int or string "id"')
        if image["id"] in images:
            raise UserError(f"{path}: images[{i}]: id {image['id']!r} is given twice")
        images[image["id"]] = image
    captions: dict[Any, list[tuple[int, dict[str, Any]]]] = {key: [] for key in images}
    for i, ann in enumerate(data["annotations"]):
        if (
            not isinstance(ann, dict)
            or not _is_id(ann.get("image_id"))
            or not isinstance(ann.get("caption"), str)
        ):
            raise UserError(
                f'{path}: annotations[{i}]: expected an object with "image_id" and a string "caption"'
            )
        if ann["image_id"] not in captions:
            raise UserError(f"{path}: annotations[{i}]: image_id {ann['image_id']!r} is not among the images")
        captions[ann["image_id"]].append((i, ann))
    stem = safe_name(path.stem, 30)  # ids stay within the 120 characters an image name keeps
    for number, (image_id, image) in enumerate(images.items(), 1):
        where = f"{path}:image {image_id}"
        meta = {"image_id": image_id, **({"file_name": image["file_name"]} if "file_name" in image else {})}
        if not captions[image_id]:
            yield Row(where, number, {}, meta, error="no caption for this image")
            continue
        base = f"{stem}-{_id_part(image_id)}"
        chosen = captions[image_id] if options.all_captions else captions[image_id][:1]
        for n, (i, ann) in enumerate(chosen):
            # Captions carry stray spaces and newlines in the official files: one line, single spaces.
            prompt = " ".join(ann["caption"].split())
            ann_id = ann.get("id", f"n{n}")
            item_id = f"{base}-{_id_part(ann_id)}" if options.all_captions else base
            record = {"prompt": prompt, "id": item_id}
            yield Row(f"{where} (annotations[{i}])", number, record, {**meta, "annotation_id": ann_id})


def _is_id(value: Any) -> bool:
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, str) and bool(value)
    )


def _id_part(value: Any) -> str:
    """An id as a file-name part: ints padded as COCO names its files (000000397133.jpg), text made safe."""
    if isinstance(value, int):
        return f"{value:012d}"
    return _safe(str(value), 32)


def _safe(text: str, max_len: int) -> str:
    """Text as a file-name part of at most max_len + 9 characters: made safe (and cut), with a digest of
    the original whenever that changed it, so two different texts never give the same part."""
    name = safe_name(text, max_len)
    return name if name == text else f"{name}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


# --------------------------------------------------------------------------- data_prep manifests


def _manifest(source: Source, options: Options) -> Iterator[Row]:
    """Every sample of a prepared split, in manifest order, read with core's shard reader."""
    manifest = load_manifest(source.path)
    split = source.split
    verify_shards(manifest, split, checksum=False)  # missing or cut shards: one line, before reading
    base = f"{_safe(manifest.dataset, 24)}-{_safe(split, 16)}"  # ids within 120 characters
    for number, sample in enumerate(read_split(manifest, split), 1):
        key = sample["__key__"]
        where = f"{source}:{key}"
        captions = [" ".join(c.split()) for c in captions_of(sample)]
        meta = {"key": key, "captions": captions}
        real = Reference(str(source.path), split, key)
        if not any(captions):
            yield Row(where, number, {}, meta, real, error="no caption for this sample")
            continue
        chosen = list(enumerate(captions)) if options.all_captions else [(0, captions[0])]
        for n, caption in chosen:
            item_id = f"{base}-{_safe(key, 48)}" + (f"-c{n}" if options.all_captions else "")
            yield Row(where, number, {"prompt": caption, "id": item_id}, meta, real)
