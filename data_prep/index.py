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
import posixpath
import queue
import re
import struct
import tarfile
import threading
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO
from zlib import adler32

from braceexpand import UnbalancedBracesError, braceexpand

from core.remote import fsspec_of, is_remote, local_path, open_shard, remote_size, scheme
from core.secrets import redact, secret_problem
from core.shards import IMAGE_KEYS, HashingReader, captions_of
from data_prep.samples import split_name_problem
from data_prep.shards import ShardRecord, ShardResult, folder_info, rejection
from plumbing.errors import LocalError, UserError

UNREADABLE_SHARD = "unreadable shard"
NO_IMAGE = "no image"
NO_CAPTION = "no caption"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass(frozen=True)
class IndexJob:
    """One existing shard to count and hash (a `Job` for the shared writer's plan, tasks and merge)."""

    split: str
    name: str  # its path relative to the split's common folder: unique, and what sizes.json lists
    location: str  # an absolute path, or a URL or pipe: command as given (core.remote)

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
        webdataset's own iterator, the trainer's (a second read: only for compressed or odd tars)."""
        rejected: list[dict[str, str]] = []

        def check(group: Group) -> None:
            problem = _sample_problem(group[1])
            if problem:
                rejected.append(rejection(f"{self.name}:{group[0]}", *problem))

        try:
            try:
                with open_shard(self.location) as f:
                    groups, digest, size = _walk_plain(f, check)
            except _NotPlain:
                rejected.clear()
                with open_shard(self.location) as f:
                    groups, digest, size = _walk_webdataset(f, self.location)
                for group in groups:
                    check(group)
        except (tarfile.TarError, ValueError, OSError, EOFError, zlib.error, LocalError) as err:
            why = redact(" ".join(str(err.args[0] if err.args else err).split()))[:200]
            return ShardResult(
                self.split, self.name, None, [rejection(self.name, UNREADABLE_SHARD, f"left out: {why}")]
            )
        record = ShardRecord(self.name, len(groups), size, digest, self.location)
        return ShardResult(self.split, self.name, record, rejected)


# --------------------------------------------------------------------------- reading a shard

Group = tuple[str, dict[str, bytes]]  # a sample's key and its members (image data left out)
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_KEEP = ("txt", "json")  # the members whose bytes the checks read
_CHUNK = 1 << 18  # read and hashed while still in the CPU's cache: faster than 1 MiB pieces, here
_SLOTS = 2  # buffers taking turns: one read and walked while the other hashes
_HEADER = struct.Struct("100s24x12s12x8s1s")  # name, size, checksum, type (POSIX ustar)
_NO_CHECKSUM = bytes(8)
_CHECKSUM_BASE = 8 * 32  # a header's checksum sums its own 8-byte field as spaces (POSIX ustar)


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
    return groups, stream.finish(), stream.size


class _Hasher:
    """sha256 of a shard's chunks, in the order given, on a thread of its own: hashlib lets go of the
    GIL while it hashes a chunk (CPython's hashlib: for 2 KiB or more), so the header walk on the
    calling thread runs at the same time on another core, and index costs about what sha256 does."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.error: BaseException | None = None
        self.todo: queue.SimpleQueue[tuple[memoryview, threading.Event] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="index-sha256", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.todo.get()) is not None:
            chunk, done = item
            try:
                if self.error is None:
                    self.sha.update(chunk)
            except BaseException as err:  # noqa: BLE001 - raised on the walk's thread, by close()
                self.error = err
            finally:  # every chunk's event is set, whatever happened: the walk never waits forever
                chunk.release()
                done.set()

    def add(self, chunk: memoryview, done: threading.Event) -> None:
        done.clear()
        self.todo.put((chunk, done))

    def close(self) -> str:
        """Wait for every chunk given; the hex digest."""
        if self.thread.is_alive():
            self.todo.put(None)
            self.thread.join()
        if self.error is not None:
            raise self.error
        return self.sha.hexdigest()


class _Window:
    """A shard read once, front to back, in big chunks into reused buffers (`readinto`: no fresh
    memory for each chunk, as hashlib.file_digest reads), each chunk hashed whole on `_Hasher`'s thread
    while this one walks it; headers are parsed where they lie in the buffer, small members copied out
    of it, and the bytes between them never touched again. Two buffers take turns: a chunk is read into
    one while the other's may still be hashing; the tail of a header or member across the border is
    copied to the front of the next."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.hasher = f, _Hasher()
        self.readinto = getattr(f, "readinto", None)
        self.slots = [_SPARE.pop() if _SPARE else bytearray(2 * _CHUNK) for _ in range(_SLOTS)]
        self.views = [memoryview(s) for s in self.slots]
        self.hashed = [threading.Event() for _ in range(_SLOTS)]
        for event in self.hashed:
            event.set()
        self.turn = 0
        self.buf, self.view = self.slots[0], self.views[0]
        self.base, self.hi, self.size = 0, 0, 0  # buf[:hi] is bytes [base, base + hi) of the file

    def reach(self, at: int, n: int) -> int:
        """Make bytes [at, at + n) of the file (fewer at its end) lie in the buffer; return where `at`
        is in it. `at` never goes back before a past call's."""
        while self.base + self.hi < at + n:
            end = self.base + self.hi
            keep = end - at if at < end else 0  # a header or member across the chunks' border (rare)
            got = self._next(keep)
            if not got:
                break
            self.base, self.hi = (at if keep else end), keep + got
        return at - self.base

    def _next(self, keep: int) -> int:
        """Read the next chunk into the other buffer, after the last `keep` bytes of this one, and hand
        it to the hashing thread; that buffer is the window's from then on. The bytes read (0: the end)."""
        turn = (self.turn + 1) % _SLOTS
        self.hashed[turn].wait()  # its last chunk hashed: free to overwrite
        if keep + _CHUNK > len(self.slots[turn]):  # a member bigger than a chunk (a long caption file)
            self.slots[turn] = bytearray(keep + _CHUNK)  # new, not resized: no view of it can be left
            self.views[turn] = memoryview(self.slots[turn])
        buf, view = self.slots[turn], self.views[turn]
        if keep:
            buf[:keep] = self.view[self.hi - keep : self.hi]
        got = self._read(view[keep : keep + _CHUNK])
        if got:
            self.hasher.add(view[keep : keep + got], self.hashed[turn])
            self.size += got
            self.turn, self.buf, self.view = turn, buf, view
        return got

    def take(self, at: int, n: int) -> bytes:
        """Bytes [at, at + n) of the file (fewer at its end)."""
        start = self.reach(at, n)
        return bytes(self.view[start : min(start + n, self.hi)]) if start < self.hi else b""

    def _read(self, into: memoryview) -> int:
        if self.readinto is not None:
            return self.readinto(into) or 0
        data = self.f.read(len(into))  # a remote stream (core.remote): its own chunks, copied once
        into[: len(data)] = data
        return len(data)

    def finish(self) -> tuple[str, int]:
        """Read (and hash) the rest: the end-of-archive padding."""
        while got := self._next(0):
            self.base, self.hi = self.base + self.hi, got
        return self.hasher.close(), self.size

    def close(self) -> None:
        """Stop the hashing thread; the buffers go to the next shard's window (this process's)."""
        self.hasher.close()
        if self.slots:
            _SPARE[:] = self.slots[:_SLOTS]
            self.slots = []


# The last window's buffers, for the next: 1 MiB of fresh memory per shard cost ~0.3 ms, 5 % of a walk.
_SPARE: list[bytearray] = []


def _walk_plain(
    f: BinaryIO, check: Callable[[Group], None] = lambda group: None
) -> tuple[list[Group], str, int]:
    """`_walk_headers`, with a header field that does not parse (tarfile: "invalid header", which ends
    its reading there quietly) left to webdataset's reader too. `check` sees each sample once it is
    whole, during the walk: while the other thread still hashes."""
    window = _Window(f)
    try:
        return _walk_headers(window, check)
    except ValueError as err:
        raise _NotPlain(f"a header field that does not parse ({err})") from None
    finally:
        window.close()  # its hashing thread, when the walk ends early


def _walk_headers(window: _Window, check: Callable[[Group], None]) -> tuple[list[Group], str, int]:
    """The samples of a plain ustar/GNU/PAX tar, grouped as webdataset groups them, from the headers
    alone (image bytes are hashed, never kept), with every byte read once, in big chunks: indexing runs
    near the speed of sha256. It follows tarfile's reading (Lib/tarfile.py: frombuf, next, _proc_pax,
    _proc_gnulong) for the plain case and raises `_NotPlain` for anything else (compressed, sparse,
    global PAX headers, base-256 sizes, odd checksums, a truncated end, a duplicate member).

    Each header is read where it lies in the buffer (one struct unpack, no copy of its 512 bytes):
    per member, Python's work is what costs here, next to sha256's, so the common member (a regular
    file, its size and checksum as tarfile's writer writes them) takes the fewest steps. The numeric
    fields a sample does not need (mode, uid, gid, mtime, device numbers) are not parsed: one that
    tarfile cannot parse, under a checksum that matches, ends tarfile's reading there and not this
    walk's."""
    buf, view, base, hi = window.buf, window.view, window.base, window.hi
    unpack, sums = _HEADER.unpack_from, _CHECKSUMS
    groups: list[Group] = []
    current, members = None, {}  # the last sample's key and members
    long_name, pax_path = "", ""
    at = 0
    while True:
        o = at - base
        if o + 512 > hi:
            o = window.reach(at, 512)
            buf, view, base, hi = window.buf, window.view, window.base, window.hi
            if o + 512 > hi:
                if o >= hi:
                    break  # tarfile: no more headers is the end of the archive
                raise _NotPlain("not a plain tar")
        raw_name, raw_size, field, kind = unpack(buf, o)
        # The header's byte sum from Adler-32's first half (RFC 1950 §8.2: 1 + the byte sum, mod 65521:
        # exact for 256 bytes, at most 65,280), against what its checksum field says the sum is: a
        # quarter of the time of sum() over the block, the biggest part of a header's cost here.
        total = (adler32(view[o : o + 256]) & 0xFFFF) + (adler32(view[o + 256 : o + 512]) & 0xFFFF) - 2
        expected = sums.get(field)
        if expected is None:
            expected = _checksum_sum(field)
            if len(sums) < 1 << 17:  # every valid one is below 131,072: a bound for odd files
                sums[field] = expected
        if total != expected:
            if field == _NO_CHECKSUM and not total:
                break  # tarfile: a zero block is the end of the archive
            raise _NotPlain("not a plain tar" if at == 0 and buf[o : o + 2] == b"\x1f\x8b" else "checksum")
        try:  # tarfile's writer: 11 octal digits and a NUL
            length = int(raw_size[:11], 8) if raw_size[11] == 0 else _size(buf, o)
        except ValueError:
            length = _size(buf, o)
        data_at = at + 512
        at = data_at + ((length + 511) & -512)
        if kind != b"0" and kind != b"\0":
            if kind == b"L" or kind == b"x":
                data = window.take(data_at, length)
                buf, view, base, hi = window.buf, window.view, window.base, window.hi
                if len(data) != length:
                    raise _NotPlain("truncated")
                if kind == b"L":
                    long_name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                else:
                    pax_path = _pax_path(data)
                continue
            if kind not in (b"5", b"1", b"2") or length:
                raise _NotPlain(f"member type {kind!r}")
            long_name = pax_path = ""
            continue  # not a regular file: webdataset skips it
        name = raw_name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if buf[o + 345]:
            prefix = bytes(view[o + 345 : o + 500]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}" if prefix else name
        if pax_path or long_name:
            name = pax_path or long_name
            long_name = pax_path = ""
        dot = name.find(".")
        if dot > 0 and "/" not in name and not name.startswith("__"):
            key, suffix = name[:dot], name[dot + 1 :].lower()  # what the two patterns give a plain name
        else:
            if name.endswith("/"):
                continue  # a directory: webdataset skips it
            if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
                continue
            match = _KEY.match(name)
            if not match:
                continue
            key, suffix = match.group(1), match.group(2).lower()
        value = b""
        if suffix in _KEEP:
            start = data_at - base
            if start + length <= hi:  # in the chunk in hand (nearly always)
                value = view[start : start + length].tobytes()  # one copy (a bytearray slice is two)
            else:
                value = window.take(data_at, length)
                buf, view, base, hi = window.buf, window.view, window.base, window.hi
                if len(value) != length:
                    raise _NotPlain("truncated")
        if key != current:
            if groups:
                check(groups[-1])
            current, members = key, {}
            groups.append((key, members))
        elif suffix in members:
            raise _NotPlain("duplicate member")  # webdataset's reader raises on it: let it say so
        members[suffix] = value
    window.take(at, 0)  # the last member's data runs to the end: it must all be there
    if window.base + window.hi < at:
        raise _NotPlain("truncated")
    if groups:
        check(groups[-1])
    digest, size = window.finish()
    return groups, digest, size


_CHECKSUMS: dict[bytes, int] = {}  # a checksum field → the byte sum of a header that has it (a cache)


def _checksum_sum(field: bytes) -> int:
    """The byte sum of the whole 512-byte block, its checksum field included as written, that makes
    `field` the right checksum (tarfile's nti: octal up to the first NUL, spaces stripped; the sum
    counts the field's own 8 bytes as spaces), or -1 for a field that does not parse."""
    try:
        value = int(field.split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return -1
    return value - _CHECKSUM_BASE + sum(field) if value >= 0 else -1


def _size(buf: bytearray, o: int) -> int:
    """A header's size field the way tarfile reads it (nti); base-256 sizes are left to webdataset."""
    if buf[o + 124] & 0x80:
        raise _NotPlain("base-256 size")
    return int(bytes(buf[o + 124 : o + 136]).split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_path(data: bytes) -> str:
    """The `path` of a PAX extended header (POSIX.1-2001 records "LEN key=value\\n"); `_NotPlain` for
    the keys that change more than the name."""
    path, pos = "", 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        if length < 1:  # tarfile: "invalid header"; here it would read the same record forever
            raise ValueError("a PAX record of length 0")
        keyword, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        if keyword in (b"size", b"hdrcharset") or keyword.startswith(b"GNU.sparse"):
            raise _NotPlain(f"PAX {keyword.decode(errors='replace')}")
        if keyword == b"path":
            path = value.decode("utf-8", "surrogateescape")
        pos += length
    return path


def _sample_problem(sample: dict[str, bytes]) -> tuple[str, str] | None:
    if "jpg" not in sample and not any(k in sample for k in IMAGE_KEYS):
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
    for pattern in patterns:
        problem = secret_problem(pattern)
        if problem:
            raise UserError(f"--shards {problem}")
    by_split: dict[str, list[str]] = {}
    given: dict[str, list[str]] = {}
    for pattern, split in zip(patterns, names):
        given.setdefault(split, []).append(pattern)
        for location in expand(pattern):
            if location not in by_split.setdefault(split, []):
                by_split[split].append(location)
    seen: dict[str, str] = {}
    jobs: list[IndexJob] = []
    sources: dict[str, Any] = {}
    for split, locations in by_split.items():
        for location in locations:
            if seen.setdefault(location, split) != split:
                raise UserError(f"{redact(location)}: named for both split {seen[location]!r} and {split!r}")
        common, relative = shard_names(locations)
        jobs += [IndexJob(split, name, where) for name, where in zip(relative, locations)]
        if any(is_remote(where) for where in locations):
            # What names them, not their bytes (asking every server for sizes is no part of planning).
            listing = [(where, 0) for where in sorted(locations)]
            info = folder_info(Path(), listing)
            sources[f"shards_{split}"] = asdict(info) | {"path": " ".join(given[split]), "kind": "locations"}
        else:
            listing = sorted((name, Path(where).stat().st_size) for name, where in zip(relative, locations))
            sources[f"shards_{split}"] = asdict(folder_info(Path(common), listing))
    return Indexed(jobs, {split: [] for split in by_split}, sources)


def shard_names(locations: list[str]) -> tuple[str, list[str]]:
    """The folder (or URL folder) the shards share, and each one's name below it: the path relative to
    it, as sizes.json lists it. A `pipe:` command is named by the last word in it that names a tar
    (`pipe:aws s3 cp s3://b/00001.tar -` → `00001.tar`); where that is not unique, by its number."""
    paths = []
    for where in locations:
        if scheme(where) == "pipe":
            words = re.findall(r"[^\s'\"]+?\.(?:tar|tgz|tar\.gz)(?=[\s'\";|)]|$)", where)
            where = words[-1] if words else ""
        parts = urllib.parse.urlsplit(where) if is_remote(where) else None
        paths.append(f"{parts.netloc}{parts.path}" if parts else where)
    numbered = "", [f"shard-{i:06d}.tar" for i in range(len(paths))]
    if "" in paths or len(set(paths)) != len(paths):
        return numbered
    try:
        common = os.path.commonpath([posixpath.dirname(p) for p in paths])
    except ValueError:  # local paths beside URLs
        return numbered
    return common, [posixpath.relpath(p, common) if common else p for p in paths]


def expand(pattern: str) -> list[str]:
    """Shard locations, in order, from a webdataset pattern: `::`-separated parts, each brace-expanded
    (`{00000..00099}`, as webdataset and img2dataset write them), then globs and folders of tars.
    A URL or `pipe:` command is taken as written (an fsspec URL may glob: `s3://bucket/*.tar`); the
    first of each pattern is asked for its size, so that a wrong host, path or credential is one line
    here. A local pattern that matches nothing, or names a file that is not there, is one line."""
    try:
        pieces = [p for part in pattern.split("::") for p in braceexpand(part)]
    except UnbalancedBracesError as err:
        raise UserError(f"--shards {pattern!r}: {err}") from None
    found: list[str] = []
    absent: list[str] = []
    for piece in pieces:
        if is_remote(piece):
            found += _remote(piece)
            continue
        path = Path(local_path(piece)).expanduser()
        if any(c in piece for c in "*?["):
            found += [p for p in sorted(glob.glob(str(path))) if p.endswith(TAR_SUFFIXES)]
        elif path.is_dir():
            found += sorted(str(p) for p in path.iterdir() if p.name.endswith(TAR_SUFFIXES) and p.is_file())
        elif path.is_file():
            found.append(str(path))
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
    if is_remote(found[0]):
        remote_size(found[0])  # one line now, not N unreadable shards later
    return [where if is_remote(where) else str(Path(where).resolve()) for where in found]


def _remote(piece: str) -> list[str]:
    """One remote location, or the shards an fsspec glob matches (in name order)."""
    kind = scheme(piece)
    if not any(c in piece for c in "*?[") or kind == "pipe":
        return [piece]
    if kind in ("http", "https"):
        raise UserError(
            f"--shards {redact(piece)}: an HTTP server has no listing to glob: name the shards with a "
            "brace range, e.g. https://host/shards/{00000..00099}.tar"
        )
    fs, path = fsspec_of(piece)
    prefix = f"{kind}://"
    return [prefix + p.removeprefix(prefix) for p in sorted(fs.glob(path)) if p.endswith(TAR_SUFFIXES)]
