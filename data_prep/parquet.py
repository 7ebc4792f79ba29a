"""Read Parquet image–caption datasets the way Hugging Face `datasets` writes them (and the Hub serves
them: `data/train-00000-of-00004.parquet`, or the parquet-converter's `default/train/0000.parquet`).

An Image feature is stored as a struct of `bytes` and `path` (datasets/features/image.py: the bytes of
the encoded file, or a path to it when the bytes are left out); here the path is read relative to the
Parquet file. A plain binary column (the encoded image) or a string column (a path) works too. The
caption column (`text` in diffusers' examples, `caption`, …) holds a string or a list of strings.

Splits follow datasets' data_files.py: a file named `<split>-00000-of-00004.parquet` is in <split>;
else a folder or file name with a split keyword between non-word characters (train/training →
train, validation/valid/dev/val → validation, test/testing/eval/evaluation → test); with none at all,
the hash split of `file:row`.

Parquet is read a row group at a time (pyarrow): planning reads only the caption column, and the
writer reads a row's image from its row group when it writes the row's shard, keeping one row group
per worker (datasets writes image datasets in row groups of 100 rows, config.py
PARQUET_ROW_GROUP_SIZE_FOR_IMAGE_DATASETS). A row whose image is only a URL (LAION's metadata: `url`
and `caption`) is skipped with img2dataset's command, which downloads such rows into shards.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from data_prep.folder import SPLIT_FOLDERS
from data_prep.images import MISSING, UNREADABLE_FILE, Resize
from data_prep.samples import (
    BAD_ROW,
    BAD_SPLIT,
    EMPTY_CAPTION,
    ImageText,
    clean_caption,
    hash_split,
    split_name_problem,
    unique_keys,
)
from data_prep.shards import Reject, SplitPlan, folder_info, rejection
from plumbing.errors import UserError

CAPTION_KEYS = ("text", "caption", "captions", "sentences")
URL_KEYS = ("url", "URL", "image_url", "link")
URL_ONLY = "url only"
# datasets' SPLIT_PATTERN_SHARDED ("{split}-00000-of-00004.*", the split a name matching _split_re).
_SHARDED = re.compile(r"^(\w+(?:\.\w+)*)-\d{5}-of-\d{5}")
_KEYWORD = re.compile(r"(?:^|[-._ 0-9])(" + "|".join(SPLIT_FOLDERS) + r")(?=[-._ 0-9]|$)")


def img2dataset_hint(file: str, url_key: str, caption_key: str) -> str:
    return (
        f"download the images with img2dataset --url_list {file} --input_format parquet "
        f"--url_col {url_key} --caption_col {caption_key} --output_format webdataset "
        "--output_folder shards, then: python -m data_prep index --shards shards"
    )


# --------------------------------------------------------------------------- one row's image


@dataclass(frozen=True)
class ParquetRef:
    """One row's image: row `row` of row group `group` of `file`, read in the writing worker."""

    file: str
    group: int
    row: int
    column: str
    item: str  # file:row, for messages

    def read(self) -> bytes:
        value = _row_group(self.file, self.group, self.column)[self.row].as_py()
        if isinstance(value, dict):  # datasets' Image: {"bytes": …, "path": …}
            data, path = value.get("bytes"), value.get("path")
            if data:
                return bytes(data)
            value = path
        if isinstance(value, bytes) and value:
            return value
        if not value:
            raise Reject(BAD_ROW, f"{self.item}: no image bytes and no path")
        path = str(value)
        if "://" in path:
            hint = img2dataset_hint(self.file, "<a column of the URLs>", "<the caption column>")
            raise Reject(URL_ONLY, f"{path[:80]} is a URL, not an image: {hint}")
        full = os.path.join(os.path.dirname(self.file), path)
        try:
            with open(full, "rb") as f:
                return f.read()
        except FileNotFoundError:
            raise Reject(MISSING, f"{self.item}: no such file {full}") from None
        except OSError as err:
            raise Reject(UNREADABLE_FILE, f"{self.item}: cannot read {full} ({err})") from None

    @property
    def where(self) -> str:
        return self.item


_FILES: dict[tuple[int, str], Any] = {}
_GROUP: dict[int, tuple[tuple[str, int, str], Any]] = {}


def _row_group(file: str, group: int, column: str) -> Any:
    """The column of one row group, as an Arrow array: one per process at a time (a shard's rows run
    through row groups in order, so each is read once), Parquet files kept open per process."""
    import pyarrow.parquet as pq

    pid, key = os.getpid(), (file, group, column)
    held = _GROUP.get(pid)
    if held is None or held[0] != key:
        _GROUP.pop(pid, None)  # let the last one go before the next is read
        handle = _FILES.get((pid, file))
        if handle is None:
            handle = _FILES[(pid, file)] = pq.ParquetFile(file)
        held = _GROUP[pid] = (key, handle.read_row_group(group, columns=[column]).column(0).combine_chunks())
    return held[1]


# --------------------------------------------------------------------------- the dataset


@dataclass
class ParquetSource:
    splits: dict[str, SplitPlan]
    rejected: list[dict[str, str]]
    split_source: str
    sources: dict[str, Any]


@dataclass(frozen=True)
class _Row:
    file: str
    rel: str
    group: int
    row: int  # in its row group
    number: int  # in its file, from 0 (datasets' row index)
    captions: tuple[str, ...]

    @property
    def item(self) -> str:
        return f"{self.rel}:{self.number}"


def read_parquet(source: str, image_key: str, caption_key: str, resize: Resize) -> ParquetSource:
    """Every row with a caption, one sample each (its image read when its shard is written), in splits."""
    root, files = find_files(source)
    rejected: list[dict[str, str]] = []
    rows: list[_Row] = []
    chosen = caption_key
    for path in files:
        rel = path.relative_to(root).as_posix()
        found, chosen = _rows(path, rel, image_key, caption_key or chosen, rejected)
        rows += found
    by_split, split_source = _splits(rows, files, root, rejected)
    keys = dict(zip((p.relative_to(root).as_posix() for p in files), unique_keys([p.name for p in files])))
    splits = {}
    for split, chosen_rows in by_split.items():
        splits[split] = SplitPlan(
            [
                ImageText(
                    f"{keys[r.rel]}_{r.number:06d}",
                    r.item,
                    ParquetRef(r.file, r.group, r.row, image_key, r.item),
                    r.captions,
                    r.item,
                    split,
                    resize,
                )
                for r in chosen_rows
            ]
        )
    listing = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in files)
    return ParquetSource(splits, rejected, split_source, {"parquet": asdict(folder_info(root, listing))})


def find_files(source: str) -> tuple[Path, list[Path]]:
    """The .parquet files `source` names (a file, a folder searched recursively as datasets does,
    hidden ones left out, or a glob), in name order, and the folder they share."""
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if p.endswith(".parquet")]
    elif path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*.parquet")
            if not any(part.startswith(".") for part in p.relative_to(path).parts) and p.is_file()
        )
    elif path.is_file():
        files = [path]
    else:
        raise UserError(
            f"{source}: no such file or folder (expected .parquet files, a folder of them or a glob)"
        )
    if not files:
        raise UserError(f"{source}: no .parquet files (expected e.g. data/train-00000-of-00001.parquet)")
    files = [p.resolve() for p in files]
    root = path.resolve() if path.is_dir() else Path(os.path.commonpath([p.parent for p in files]))
    return root, files


def _rows(
    path: Path, rel: str, image_key: str, caption_key: str, rejected: list[dict[str, str]]
) -> tuple[list[_Row], str]:
    """The rows of one file that have a caption (reading the caption column a row group at a time),
    and the caption column used."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a Parquet file ({' '.join(str(err).split())[:200]})") from None
    schema = handle.schema_arrow
    columns = schema.names
    if image_key not in columns:
        url = next((k for k in URL_KEYS if k in columns), None)
        if url:
            caption = caption_key or next((k for k in CAPTION_KEYS if k in columns), "caption")
            hint = img2dataset_hint(str(path), url, caption)
            raise UserError(f"{path}: its rows hold image URLs ({url!r}), not images: {hint}")
        raise UserError(
            f"{path}: no column {image_key!r} (--image-key); it has {', '.join(map(repr, columns))}"
        )
    kind = schema.field(image_key).type
    if not (
        (
            pa.types.is_struct(kind)
            and {"bytes", "path"} & {kind.field(i).name for i in range(kind.num_fields)}
        )
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
        or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    ):
        raise UserError(
            f"{path}: column {image_key!r} is {kind}, expected datasets' Image (a struct of bytes and path), "
            "image bytes or paths"
        )
    key = caption_key or next((k for k in CAPTION_KEYS if k in columns), "")
    if key not in columns:
        wanted = repr(caption_key) if caption_key else f"caption column (one of {', '.join(CAPTION_KEYS)})"
        raise UserError(f"{path}: no {wanted} (--caption-key); it has {', '.join(map(repr, columns))}")
    rows: list[_Row] = []
    number = 0
    for group in range(handle.num_row_groups):
        try:
            captions = handle.read_row_group(group, columns=[key]).column(0).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise UserError(
                f"{path}: row group {group} does not read ({' '.join(str(err).split())[:200]})"
            ) from None
        for row, caption in enumerate(captions):
            item = f"{rel}:{number}"
            texts = (
                [clean_caption(c) for c in caption] if isinstance(caption, list) else [clean_caption(caption)]
            )
            texts = [t for t in dict.fromkeys(texts) if t]
            if texts:
                rows.append(_Row(str(path), rel, group, row, number, tuple(texts)))
            else:
                rejected.append(rejection(item, EMPTY_CAPTION, f"row {number}: empty {key}"))
            number += 1
    return rows, key


def split_of(rel: str) -> str | None:
    """The split datasets gives a file: `<split>-00000-of-00004.*`, else a split keyword in a folder
    name, then in the file name; None without one."""
    *folders, name = rel.split("/")
    sharded = _SHARDED.match(name)
    if sharded:
        return sharded.group(1)
    for part in [*folders, name.rsplit(".", 1)[0]]:
        match = _KEYWORD.search(part)
        if match:
            return SPLIT_FOLDERS[match.group(1)]
    return None


def _splits(
    rows: list[_Row], files: list[Path], root: Path, rejected: list[dict[str, str]]
) -> tuple[dict[str, list[_Row]], str]:
    """Rows by their file's split; without any split in any name, the hash split of file:row. A file
    without a split beside files with one is left out and listed (datasets would not read it either)."""
    named = {p.relative_to(root).as_posix(): split_of(p.relative_to(root).as_posix()) for p in files}
    if not any(named.values()):
        position = {r.item: i for i, r in enumerate(rows)}
        # Back in file order within each split: a shard then reads each row group once.
        return {
            s: [rows[i] for i in sorted(position[item] for item in items)]
            for s, items in hash_split(list(position)).items()
        }, "hash of file:row"
    by_split: dict[str, list[_Row]] = {}
    for rel, split in named.items():
        problem = split_name_problem(split) if split else "no split in its name, beside files that have one"
        if problem:
            rejected.append(rejection(rel, BAD_SPLIT, f"left out: {problem}"))
            named[rel] = None
        elif split:
            by_split.setdefault(split, [])
    for row in rows:
        split = named[row.rel]
        if split:
            by_split[split].append(row)
    order = ["train", "validation", "test"]
    ranked = sorted(by_split, key=lambda s: (order.index(s) if s in order else len(order), s))
    return {s: by_split[s] for s in ranked}, "file names (datasets' split naming)"
