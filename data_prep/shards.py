"""Write samples into WebDataset tar shards: deterministic, parallel, resumable, never half-written.

* Deterministic: samples are cut into shards before any work starts, and every tar member gets the
  same mtime, owner and mode, so the bytes do not depend on `workers` or on the clock.
* Never half-written: a shard is written under a hidden temporary name and renamed when complete;
  the manifest is written the same way, last.
* Resumable: after every shard a partial manifest records what is done; a rerun with the same
  config and sources keeps each shard whose sha256 matches and redoes the rest.
* Safe: an output made from another config or other sources is refused unless `overwrite`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.manifest import FORMAT_VERSION, MANIFEST, PARTIAL, ShardRecord, SplitRecord
from plumbing import __version__
from plumbing.errors import UserError
from plumbing.files import (
    atomic_write_json,
    file_digests,
    is_tmp_name,
    read_json,
    sha256_file,
    tmp_name,
)
from plumbing.logs import progress
from plumbing.tars import end_of_archive, tar_member

log = logging.getLogger("data_prep")


class Reject(Exception):
    """A sample that cannot be used (missing, undecodable): skipped, counted and listed, never fatal."""


class Sample(Protocol):
    key: str

    def members(self) -> dict[str, bytes]:
        """Extension → bytes; raises `Reject` for a sample that cannot be used."""
        ...


@dataclass(frozen=True)
class SourceInfo:
    path: str
    kind: str  # "file" or "folder"
    bytes: int
    files: int
    md5: str = ""
    sha256: str = ""


def describe_source(path: Path, digests: Sequence[str]) -> SourceInfo:
    """Size and checksums of a source file; for a folder, its file count, size and a listing digest."""
    if path.is_file():
        sums = file_digests(path, *digests) if digests else {}
        return SourceInfo(
            str(path), "file", path.stat().st_size, 1, sums.get("md5", ""), sums.get("sha256", "")
        )
    return folder_info(path, sorted(_walk(path, "")))


def folder_info(path: Path, files: Sequence[tuple[str, int]]) -> SourceInfo:
    """A folder from its sorted (name, size) list: the digest of names and sizes is cheap and changes
    when files are added, removed or replaced by others of another size."""
    listing = hashlib.sha256()
    for name, size in files:
        listing.update(f"{name}\0{size}\n".encode())
    return SourceInfo(
        str(path), "folder", sum(size for _, size in files), len(files), sha256=listing.hexdigest()
    )


def _walk(folder: Path, prefix: str) -> Iterator[tuple[str, int]]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield from _walk(Path(entry.path), f"{prefix}{entry.name}/")
            elif entry.is_file():
                yield f"{prefix}{entry.name}", entry.stat().st_size


@dataclass
class SplitPlan:
    samples: list[Any]  # objects following the `Sample` protocol (picklable, sent to workers)
    rejected: list[dict[str, str]] = field(default_factory=list)  # found before writing (e.g. missing image)


@dataclass(frozen=True)
class ShardJob:
    split: str
    path: Path
    samples: list[Any]


@dataclass(frozen=True)
class ShardResult:
    split: str
    record: ShardRecord
    rejected: list[dict[str, str]]


class _ShardFile:
    """Writes a tar with one `writev` per sample (no copy of the JPEG bytes) and hashes it as it goes.

    The hash stays on this thread: a helper thread would lend one worker a second core, which the
    next worker then lacks — `workers` is the one knob for CPU parallelism.
    """

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0
        self._sha = hashlib.sha256()

    def write(self, parts: list[bytes]) -> None:
        total = sum(len(p) for p in parts)
        done = os.writev(self.fd, parts)
        if done < total:  # a short write (rare on regular files): finish it plainly
            os.write(self.fd, b"".join(parts)[done:])
        self.size += total
        for part in parts:
            self._sha.update(part)

    def close(self) -> str:
        """Close the file; return the sha256 of everything written."""
        os.close(self.fd)
        return self._sha.hexdigest()


def write_shard(job: ShardJob) -> ShardResult:
    """Build every sample of `job` and write them as one tar, atomically. Runs in a worker."""
    rejected: list[dict[str, str]] = []
    count = 0
    tmp = tmp_name(job.path)
    try:
        out = _ShardFile(tmp)
        try:
            for sample in job.samples:
                try:
                    members = sample.members()
                except Reject as why:
                    rejected.append({"item": sample.key, "reason": str(why)})
                    continue
                out.write(
                    [
                        part
                        for ext in sorted(members)
                        for part in tar_member(f"{sample.key}.{ext}", members[ext])
                    ]
                )
                count += 1
            out.write([end_of_archive(out.size)])
        finally:
            digest = out.close()
        # A rename, not fsync + rename: a killed process never leaves a partial shard under a final
        # name, and after a machine crash every shard is checked against its recorded size and
        # sha256 (on rerun here, before training in the trainer) instead. Nothing data_prep writes
        # is fsynced: per shard it cost ~30 µs/image, and one fsync at the end flushes every shard.
        os.replace(tmp, job.path)
    finally:
        tmp.unlink(missing_ok=True)
    return ShardResult(job.split, ShardRecord(job.path.name, count, out.size, digest), rejected)


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def _plan(out: Path, dataset: str, splits: dict[str, SplitPlan], shard_size: int) -> list[ShardJob]:
    jobs = []
    for split, plan in splits.items():
        for index, start in enumerate(range(0, len(plan.samples), shard_size)):
            path = out / split / shard_name(dataset, split, index)
            jobs.append(ShardJob(split, path, plan.samples[start : start + shard_size]))
    return jobs


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _ours(out: Path, dataset_pattern: re.Pattern[str]) -> list[Path]:
    """Files in `out` with names this tool writes (shards, sizes.json, manifests, temporaries)."""
    found = [p for p in (out / MANIFEST, out / PARTIAL) if p.exists()]
    for sub in sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []:
        for p in sub.iterdir():
            if p.is_file() and (
                dataset_pattern.fullmatch(p.name) or p.name == "sizes.json" or is_tmp_name(p.name)
            ):
                found.append(p)
    return found


def _previous(out: Path, fp: str, overwrite: bool) -> dict[str, Any]:
    """The manifest (final or partial) of an earlier run with the same fingerprint, else {}.

    An earlier output made from another config or other sources is refused unless `overwrite`.
    """
    existing = _ours(out, re.compile(r"[\w.-]+-\w+-\d{6}\.tar"))
    for candidate in (out / MANIFEST, out / PARTIAL):
        if candidate.exists():
            old = read_json(candidate)
            if old.get("fingerprint") == fp:
                return old
            break
    else:
        finals = [p for p in existing if not is_tmp_name(p.name)]
        if not finals:
            return {}
        candidate = finals[0]
    if not overwrite:
        raise UserError(
            f"{out} already holds a different prep ({candidate.relative_to(out)} was made from another config "
            "or other sources); pass --overwrite to replace it, or choose another --out"
        )
    for p in existing:
        p.unlink()
    log.info("--overwrite: removed %d files of the earlier prep in %s", len(existing), out)
    return {}


class Writers:
    """The processes that write shards. Started first thing (`with Writers(n) as writers:`), so that
    their start overlaps the reading of the sources instead of following it."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._pool: Any = None

    def __enter__(self) -> Writers:
        if self.workers > 1:
            method = "fork" if sys.platform.startswith("linux") else "spawn"
            self._pool = multiprocessing.get_context(method).Pool(self.workers)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] else self._pool.close()
            self._pool.join()

    def run(self, jobs: list[ShardJob]) -> Iterator[ShardResult]:
        """Results in completion order; in this process when there is one worker."""
        if self._pool is None or len(jobs) <= 1:
            return map(write_shard, jobs)
        return self._pool.imap_unordered(write_shard, jobs)


def write_dataset(
    out: Path,
    dataset: str,
    splits: dict[str, SplitPlan],
    *,
    shard_size: int,
    writers: Writers,
    overwrite: bool,
    identity: dict[str, Any],
    extra: dict[str, Any],
    show_progress: bool = True,
) -> dict[str, Any]:
    """Write (or complete) `out`: shards per split, sizes.json per split, manifest.json. Returns it."""
    out.mkdir(parents=True, exist_ok=True)
    fp = fingerprint({"dataset": dataset, "shard_size": shard_size, **identity})
    old = _previous(out, fp, overwrite)
    old_records = {r["name"]: ShardRecord(**r) for sp in old.get("splits", {}).values() for r in sp["shards"]}
    jobs = _plan(out, dataset, splits, shard_size)
    for split in splits:
        (out / split).mkdir(exist_ok=True)
        for stale in (out / split).iterdir():
            if is_tmp_name(stale.name):
                stale.unlink()  # left by a killed run: never a final name, safe to drop

    done: dict[str, ShardResult] = {}
    todo = []
    for job in jobs:
        record = old_records.get(job.path.name)
        if (
            record
            and job.path.is_file()
            and job.path.stat().st_size == record.bytes
            and sha256_file(job.path) == record.sha256
        ):
            done[job.path.name] = ShardResult(job.split, record, _rejected_of(old, job))
        else:
            todo.append(job)
    if done:
        log.info("resuming: %d of %d shards already complete and verified", len(done), len(jobs))

    def manifest(partial: bool) -> dict[str, Any]:
        return _manifest(dataset, fp, splits, jobs, done, identity, extra, partial)

    total = sum(len(j.samples) for j in jobs)
    bar = progress(total, f"{dataset} shards", "img", enabled=show_progress)
    bar.update(sum(len(j.samples) for j in jobs if j.path.name in done))
    for result in writers.run(todo):
        done[result.record.name] = result
        # Not fsynced: it only guides a rerun, which re-hashes every shard it keeps anyway.
        atomic_write_json(out / PARTIAL, manifest(partial=True), durable=False)
        bar.update(result.record.num_samples + len(result.rejected))
    bar.close()

    final = manifest(partial=False)
    for split in splits:
        sizes = {s["name"]: s["num_samples"] for s in final["splits"][split]["shards"]}
        atomic_write_json(out / split / "sizes.json", sizes, durable=False)
    atomic_write_json(out / MANIFEST, final, durable=False)
    (out / PARTIAL).unlink(missing_ok=True)
    return final


def _rejected_of(old: dict[str, Any], job: ShardJob) -> list[dict[str, str]]:
    keys = {s.key for s in job.samples}
    rejected = old.get("splits", {}).get(job.split, {}).get("rejected", [])
    return [r for r in rejected if r.get("item") in keys]


def _manifest(
    dataset: str,
    fp: str,
    splits: dict[str, SplitPlan],
    jobs: list[ShardJob],
    done: dict[str, ShardResult],
    identity: dict[str, Any],
    extra: dict[str, Any],
    partial: bool,
) -> dict[str, Any]:
    records: dict[str, SplitRecord] = {}
    for split, plan in splits.items():
        results = [done[j.path.name] for j in jobs if j.split == split and j.path.name in done]
        rejected = list(plan.rejected) + [r for res in results for r in res.rejected]
        records[split] = SplitRecord([r.record for r in results], sorted(rejected, key=lambda r: r["item"]))
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "complete": not partial,
        "fingerprint": fp,
        "created_by": f"data_prep {__version__}",
        "splits": {name: rec.to_dict() for name, rec in records.items()},
        **extra,
        **identity,
    }


def summary(manifest: dict[str, Any], out: Path) -> str:
    parts = [
        f"{name} {s['num_samples']} samples in {s['num_shards']} shards"
        + (f" ({len(s['rejected'])} rejected)" if s["rejected"] else "")
        for name, s in manifest["splits"].items()
    ]
    other = len(manifest.get("rejected", []))
    tail = f"; {other} other items rejected" if other else ""
    return f"{manifest['dataset']} → {out}: " + ", ".join(parts) + tail + f" (details in {out / MANIFEST})"
