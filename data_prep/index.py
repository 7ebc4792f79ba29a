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
import hashlib
import os
import re
import tarfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

from braceexpand import UnbalancedBracesError, braceexpand

from core.shards import IMAGE_KEYS, HashingReader, captions_of
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
        caption, and hash the whole file on the way. A plain tar (what img2dataset, webdataset's
        TarWriter and data_prep write) is walked by its headers; anything else is read by
        webdataset's own iterator, the trainer's."""
        try:
            with open(self.path, "rb") as f:
                try:
                    groups, digest, size = _walk_plain(f)
                except _NotPlain:
                    f.seek(0)
                    groups, digest, size = _walk_webdataset(f, str(self.path))
        except (tarfile.TarError, ValueError, OSError, EOFError, zlib.error) as err:
            why = " ".join(str(err.args[0] if err.args else err).split())[:200]
            return ShardResult(
                self.split, self.name, None, [rejection(self.name, UNREADABLE_SHARD, f"left out: {why}")]
            )
        rejected = []
        for key, sample in groups:
            problem = _sample_problem(sample)
            if problem:
                rejected.append(rejection(f"{self.name}:{key}", *problem))
        record = ShardRecord(self.name, len(groups), size, digest, str(self.path))
        return ShardResult(self.split, self.name, record, rejected)


# --------------------------------------------------------------------------- reading a shard

Group = tuple[str, dict[str, bytes]]  # a sample's key and its members (image data left out)
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_KEEP = ("txt", "json")  # the members whose bytes the checks read
_CHUNK = 1 << 20


class _NotPlain(Exception):
    """Something the header walk does not model exactly: webdataset's own reader decides."""


def _walk_webdataset(f: BinaryIO, url: str) -> tuple[list[Group], str, int]:
    """The trainer's reader itself (core.shards.read_ranges): webdataset's tar_file_expander and
    group_by_keys, with the file hashed as it streams."""
    import webdataset as wds  # here: it imports torch, which the other sources never need

    stream = HashingReader(f)
    files = wds.tariterators.tar_file_expander(iter([{"url": url, "stream": stream}]))
    groups = [
        (s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
        for s in wds.tariterators.group_by_keys(files)
    ]
    return groups, stream.finish(), os.fstat(f.fileno()).st_size


def _walk_plain(f: BinaryIO) -> tuple[list[Group], str, int]:
    """The samples of a plain ustar/GNU/PAX tar, grouped as webdataset groups them, from the headers
    alone (image bytes are hashed, never kept): ~10x less Python per member than tarfile, so indexing
    runs near the speed of sha256. It follows tarfile's reading (Lib/tarfile.py: frombuf, next,
    _proc_pax, _proc_gnulong) for the plain case and raises `_NotPlain` for anything else (compressed,
    sparse, global PAX headers, base-256 sizes, odd checksums, a truncated end, a duplicate member)."""
    sha, size = hashlib.sha256(), 0

    def take(n: int) -> bytes:
        nonlocal size
        data = f.read(n)
        sha.update(data)
        size += len(data)
        if len(data) != n:
            raise _NotPlain("truncated")
        return data

    def skip(n: int) -> None:
        while n > 0:
            take(min(n, _CHUNK))
            n -= min(n, _CHUNK)

    groups: list[Group] = []
    long_name, pax_path = "", ""
    while True:
        block = f.read(512)
        sha.update(block)
        size += len(block)
        if not block or block.count(0) == 512:
            break  # tarfile: the end of the archive (a zero block, or no more headers)
        if len(block) != 512 or block[:2] == b"\x1f\x8b":
            raise _NotPlain("not a plain tar")
        if int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8) != 256 + sum(block[:148]) + sum(
            block[156:]
        ):
            raise _NotPlain("checksum")
        kind = block[156:157]
        if block[124] & 0x80:
            raise _NotPlain("base-256 size")
        length = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        padded = -(-length // 512) * 512
        if kind in (b"L", b"x"):
            data = take(padded)[:length]
            if kind == b"L":
                long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            else:
                pax_path = _pax_path(data)
            continue
        if kind not in (b"0", b"\0", b"5", b"1", b"2") or (kind in (b"5", b"1", b"2") and length):
            raise _NotPlain(f"member type {kind!r}")
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = block[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        name = long_name or (f"{prefix}/{name}" if prefix else name)
        name = pax_path or name
        long_name = pax_path = ""
        if kind not in (b"0", b"\0") or name.endswith("/"):
            skip(padded)
            continue  # not a regular file: webdataset skips it
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
            skip(padded)
            continue
        match = _KEY.match(name)
        if not match:
            skip(padded)
            continue
        key, suffix = match.group(1), match.group(2).lower()
        if suffix in _KEEP:
            value = take(padded)[:length]
        else:
            skip(padded)
            value = b""
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        elif suffix in groups[-1][1]:
            raise _NotPlain("duplicate member")  # webdataset's reader raises on it: let it say so
        groups[-1][1][suffix] = value
    while chunk := f.read(_CHUNK):  # the end-of-archive padding
        sha.update(chunk)
        size += len(chunk)
    return groups, sha.hexdigest(), size


def _pax_path(data: bytes) -> str:
    """The `path` of a PAX extended header (POSIX.1-2001 records "LEN key=value\\n"); `_NotPlain` for
    the keys that change more than the name."""
    path, pos = "", 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        keyword, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if keyword in (b"size", b"hdrcharset") or keyword.startswith(b"GNU.sparse"):
            raise _NotPlain(f"PAX {keyword.decode(errors='replace')}")
        if keyword == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _sample_problem(sample: dict[str, bytes]) -> tuple[str, str] | None:
    if not any(k in sample for k in IMAGE_KEYS):
        members = ", ".join(sample)
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
