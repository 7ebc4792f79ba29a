"""Index existing WebDataset shards in place: the manifest records where they are, their sample
counts, sizes and sha256; nothing is copied or rewritten.

img2dataset's `output_format=webdataset` (../shared/notes/formats.md) writes `00000.tar`, `00001.tar`, …
of samples keyed by a 9-digit id with `.jpg` (or `.png`, `.webp`), `.txt` (the caption) and `.json`;
beside them `.parquet` and `_stats.json`, which are not needed here. Samples are counted the way every
stage reads them (core.shards: webdataset's own `tar_file_expander` + `group_by_keys`), so the counts
the trainer plans with are exactly what it will read. A shard that is not a whole tar is left out
and listed; a sample without an image or a caption is listed (the trainer skips an image it cannot
decode and counts it).
"""

from __future__ import annotations

import glob
import os
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import webdataset as wds
from braceexpand import UnbalancedBracesError, braceexpand

from core.shards import HashingReader, captions_of, image_bytes
from data_prep.samples import split_name_problem
from data_prep.shards import ShardRecord, ShardResult, folder_info, rejection
from plumbing.errors import UserError

UNREADABLE_SHARD = "unreadable shard"
NO_IMAGE = "no image"
NO_CAPTION = "no caption"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class IndexJob:
    """One existing shard to count and hash (a `Job` for the shared writer's plan, tasks and merge)."""

    split: str
    name: str  # its path relative to the split's common folder: unique, and what sizes.json lists
    path: Path  # absolute

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"

    @property
    def units(self) -> int:
        return 1

    def owns(self, item: str) -> bool:
        return item == self.name or item.startswith(f"{self.name}:")

    def run(self) -> ShardResult:
        """Count the samples as the trainer's reader groups them, list those without an image or a
        caption, and hash the whole file on the way."""
        rejected, count = [], 0
        try:
            with open(self.path, "rb") as f:
                stream = HashingReader(f)
                files = wds.tariterators.tar_file_expander(iter([{"url": str(self.path), "stream": stream}]))
                for sample in wds.tariterators.group_by_keys(files):
                    count += 1
                    problem = _sample_problem(sample)
                    if problem:
                        rejected.append(rejection(f"{self.name}:{sample['__key__']}", *problem))
                digest = stream.finish()
                size = os.fstat(f.fileno()).st_size
        except (tarfile.TarError, ValueError, OSError, EOFError, zlib.error) as err:
            why = " ".join(str(err.args[0] if err.args else err).split())[:200]
            return ShardResult(
                self.split, self.name, None, [rejection(self.name, UNREADABLE_SHARD, f"left out: {why}")]
            )
        record = ShardRecord(self.name, count, size, digest, str(self.path))
        return ShardResult(self.split, self.name, record, rejected)


def _sample_problem(sample: dict[str, Any]) -> tuple[str, str] | None:
    if image_bytes(sample) is None:
        members = ", ".join(k for k in sample if not k.startswith("__"))
        return NO_IMAGE, f"no jpg/png/webp member (has {members}): the trainer skips it"
    try:
        if captions_of(sample):
            return None
    except (ValueError, UnicodeDecodeError):
        return NO_CAPTION, "its txt or json member does not decode"
    return NO_CAPTION, "no txt member and no json captions"


@dataclass
class Indexed:
    jobs: list[IndexJob]
    rejected: dict[str, list[dict[str, str]]]
    sources: dict[str, Any]


def index_shards(patterns: list[str], splits: list[str]) -> Indexed:
    """The shards each pattern names, per split (`splits`: one name for all, or one per pattern)."""
    names = splits * len(patterns) if len(splits) == 1 else splits
    for split in dict.fromkeys(names):
        problem = split_name_problem(split)
        if problem:
            raise UserError(f"--split {split!r}: {problem}")
    by_split: dict[str, list[Path]] = {}
    for pattern, split in zip(patterns, names):
        for path in expand(pattern):
            if path not in by_split.setdefault(split, []):
                by_split[split].append(path)
    seen: dict[Path, str] = {}
    jobs: list[IndexJob] = []
    sources: dict[str, Any] = {}
    for split, paths in by_split.items():
        for path in paths:
            if seen.setdefault(path, split) != split:
                raise UserError(f"{path}: named for both split {seen[path]!r} and {split!r}")
        common = Path(os.path.commonpath([p.parent for p in paths]))
        listing = sorted((p.relative_to(common).as_posix(), p.stat().st_size) for p in paths)
        jobs += [IndexJob(split, p.relative_to(common).as_posix(), p) for p in paths]
        sources[f"shards_{split}"] = asdict(folder_info(common, listing))
    return Indexed(jobs, {split: [] for split in by_split}, sources)


def expand(pattern: str) -> list[Path]:
    """Shard paths, in order, from a webdataset pattern: `::`-separated parts, each brace-expanded
    (`{00000..00099}`, as webdataset and img2dataset write them), then globs and folders of tars.
    A pattern that matches nothing, or names a file that is not there, is one line."""
    try:
        pieces = [p for part in pattern.split("::") for p in braceexpand(part)]
    except UnbalancedBracesError as err:
        raise UserError(f"--shards {pattern!r}: {err}") from None
    found: list[Path] = []
    absent: list[str] = []
    for piece in pieces:
        path = Path(piece).expanduser()
        if any(c in piece for c in "*?["):
            found += [Path(p) for p in sorted(glob.glob(str(path))) if p.endswith(TAR_SUFFIXES)]
        elif path.is_dir():
            found += sorted(p for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES) and p.is_file())
        elif path.is_file():
            found.append(path)
        else:
            absent.append(piece)
    if absent and found:
        raise UserError(
            f"--shards {pattern!r}: {len(absent)} of the {len(pieces)} files it names do not exist "
            f"(first: {absent[0]}): fix the range or the folder"
        )
    if not found:
        raise UserError(
            f"--shards {pattern!r} matches no shard (expected e.g. 'shards/{{00000..00009}}.tar' or a folder of .tar files)"
        )
    return [p.resolve() for p in found]
