"""The one writer every source shares: samples → WebDataset tar shards + manifest.json.

* Deterministic: samples are cut into shards before any work starts, and every tar member gets the
  same mtime, owner and mode, so the bytes depend neither on `workers` nor on `tasks` nor on the clock.
* Split among tasks: the one-process plan (every shard's name and samples) is cut into N contiguous
  ranges of shards holding equal shares of the samples; task K writes range K (`task_range`). Each task records every finished shard in
  `.parts/task-K-of-N.jsonl`; `merge` writes sizes.json and manifest.json from those records once
  every shard is there. One process is task 0 of 1 and merges at its end: the output is the same.
* Never half-written: a shard is written under a hidden temporary name and renamed when complete;
  the record line follows the rename, and the manifest is written last, atomically.
* Resumable: a rerun (of the whole run or of one killed task) keeps each recorded shard whose size and
  sha256 still match and redoes the rest; nothing is written twice under a final name.
* Safe: an output made from another config or other sources is refused unless `overwrite`; every
  file is written inside `out` (split folders that resolve elsewhere, e.g. through a symlink, are
  refused, and shard files are opened without following links).
* Bad input is skipped, never fatal: a sample whose `members()` raises `Reject` is left out of its
  shard and listed with its kind and reason; the closing line counts them by kind.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from core.manifest import FORMAT_VERSION, MANIFEST, ShardRecord, SplitRecord
from core.remote import is_remote, remote_size
from plumbing import __version__
from plumbing.errors import UserError
from plumbing.files import (
    atomic_write_json,
    atomic_write_text,
    file_digests,
    inside,
    is_tmp_name,
    read_json,
    sha256_file,
    tmp_name,
)
from plumbing.logs import progress
from plumbing.tars import end_of_archive, tar_member

log = logging.getLogger("data_prep")

PARTS = ".parts"  # the tasks' records, until the merge
PLAN = "plan.json"
_SHARD = re.compile(r"[\w.-]+-\w+-\d{6}\.tar")
_PART = re.compile(r"task-(\d{5})-of-(\d{5})\.jsonl")


class Reject(Exception):
    """A sample that cannot be used (missing, undecodable, no caption): skipped, counted and listed,
    never fatal. `kind` is the short reason the closing line counts ("missing file")."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(detail or kind)
        self.kind = kind


def rejection(item: str, kind: str, reason: str = "") -> dict[str, str]:
    """One entry of a manifest's `rejected` lists: what was skipped, its kind, and why in full."""
    return {"item": item, "kind": kind, "reason": reason or kind}


class Sample(Protocol):
    key: str

    def members(self) -> dict[str, bytes]:
        """Extension → bytes; raises `Reject` for a sample that cannot be used."""
        ...


# --------------------------------------------------------------------------- describing sources


@dataclass(frozen=True)
class SourceInfo:
    path: str
    kind: str  # "file", "folder" or "zip listing"
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


def zip_info(path: Path, archive: zipfile.ZipFile) -> SourceInfo:
    """A big zip (COCO's train2017.zip is 18 GB) by its central directory: every member's name, size
    and CRC-32 (APPNOTE §4.3.12), so that any changed image changes the digest without reading it."""
    listing = hashlib.sha256()
    members = archive.infolist()
    for m in members:
        listing.update(f"{m.filename}\0{m.file_size}\0{m.CRC:08x}\n".encode())
    return SourceInfo(str(path), "zip listing", path.stat().st_size, len(members), sha256=listing.hexdigest())


def _walk(folder: Path, prefix: str) -> Iterator[tuple[str, int]]:
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                yield from _walk(Path(entry.path), f"{prefix}{entry.name}/")
            elif entry.is_file():
                yield f"{prefix}{entry.name}", entry.stat().st_size


# --------------------------------------------------------------------------- the plan


@dataclass
class SplitPlan:
    samples: list[Any]  # objects following the `Sample` protocol (picklable, sent to workers)
    rejected: list[dict[str, str]] = field(default_factory=list)  # found before writing (e.g. no caption)


@dataclass(frozen=True)
class ShardResult:
    split: str
    name: str
    record: ShardRecord | None  # None: nothing usable (an indexed shard that is not a whole tar)
    rejected: list[dict[str, str]]

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"


class Job(Protocol):
    """One shard's work: written from samples (`ShardJob`) or an existing one described (index)."""

    split: str
    name: str

    @property
    def key(self) -> str: ...

    @property
    def units(self) -> int: ...

    def owns(self, item: str) -> bool: ...

    def run(self) -> ShardResult: ...


@dataclass(frozen=True)
class ShardJob:
    split: str
    name: str
    path: Path
    samples: list[Any]

    @property
    def key(self) -> str:
        return f"{self.split}/{self.name}"

    @property
    def units(self) -> int:
        return len(self.samples)

    def owns(self, item: str) -> bool:
        return any(_item(s) == item for s in self.samples)

    def run(self) -> ShardResult:
        """Build every sample and write them as one tar, atomically. Runs in a worker."""
        rejected: list[dict[str, str]] = []
        count = 0
        tmp = tmp_name(self.path)
        try:
            out = _ShardFile(tmp)
            try:
                for sample in self.samples:
                    try:
                        members = sample.members()
                    except Reject as why:
                        rejected.append(rejection(_item(sample), why.kind, str(why)))
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
            # A rename, not fsync + rename: a killed process never leaves a partial shard under a
            # final name, and after a machine crash every shard is checked against its recorded size
            # and sha256 (on rerun here, before training in the trainer) instead. Nothing data_prep
            # writes is fsynced: per shard it cost ~30 µs/image, and one fsync at the end flushes all.
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        return ShardResult(self.split, self.name, ShardRecord(self.name, count, out.size, digest), rejected)


def _item(sample: Any) -> str:
    """What a rejected sample is called: its `item` (a path, a file:line) when it has one, else its key."""
    return str(getattr(sample, "item", "") or sample.key)


def run_job(job: Job) -> ShardResult:
    return job.run()


class _ShardFile:
    """Writes a tar with one `writev` per sample (no copy of the JPEG bytes) and hashes it as it goes.

    The hash stays on this thread: a helper thread would lend one worker a second core, which the
    next worker then lacks — `workers` is the one knob for CPU parallelism.
    """

    def __init__(self, path: Path) -> None:
        # O_NOFOLLOW: a link planted under the temporary name cannot redirect the write out of `out`.
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
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


def shard_name(dataset: str, split: str, index: int) -> str:
    return f"{dataset}-{split}-{index:06d}.tar"


def plan_shards(out: Path, dataset: str, splits: dict[str, SplitPlan], shard_size: int) -> list[ShardJob]:
    """Every shard of every split, in order: `shard_size` samples each, the last of a split the rest."""
    jobs = []
    for split, plan in splits.items():
        for index, start in enumerate(range(0, len(plan.samples), shard_size)):
            name = shard_name(dataset, split, index)
            jobs.append(ShardJob(split, name, out / split / name, plan.samples[start : start + shard_size]))
    return jobs


def task_range(units: Sequence[int], task: int, tasks: int) -> range:
    """The shards (indices into the plan) of task `task` of `tasks`, from each shard's units (samples):
    contiguous, each shard to the task whose share of all the samples holds the shard's middle sample,
    so the tasks' shares differ by at most a shard (cut by count, a split's short last shards left one
    task of two with 1,200 of 2,000 images, bench.prep). A pure function of the plan: every task cuts
    the same plan the same way."""
    total = sum(units)
    owners, before = [], 0
    for n in units:
        owners.append(min(tasks - 1, (2 * before + n) * tasks // (2 * total)) if total else 0)
        before += n
    mine = [i for i, t in enumerate(owners) if t == task]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def owner(index: int, units: Sequence[int], tasks: int) -> int:
    """The task whose `task_range` holds shard `index`."""
    return next(t for t in range(tasks) if index in task_range(units, t, tasks))


def fingerprint(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# --------------------------------------------------------------------------- writing


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

    def run(self, jobs: Sequence[Job]) -> Iterator[ShardResult]:
        """Results in completion order; in this process when there is one worker. The biggest jobs go
        out first (Graham's longest-processing-time rule), so that a split's short last shards fill
        the end instead of leaving one worker alone with a full one (bench.prep's 2,000 images in
        shards of 200: 1,050 samples' time on the busier of 2 workers in plan order, 1,000 so)."""
        if self._pool is None or len(jobs) <= 1:
            return map(run_job, jobs)
        return self._pool.imap_unordered(run_job, sorted(jobs, key=lambda j: -j.units))


@dataclass(frozen=True)
class Outcome:
    """What a run did: the manifest when the output is complete, else this task's share."""

    manifest: dict[str, Any] | None
    task: int
    tasks: int
    shards: range  # this task's shards, as indices into the plan
    total: int  # shards in the plan
    kept: int  # found complete and verified
    written: int


def write_dataset(
    out: Path,
    dataset: str,
    jobs: Sequence[Job],
    rejected: dict[str, list[dict[str, str]]],
    *,
    shard_size: int,
    writers: Writers,
    overwrite: bool,
    identity: dict[str, Any],
    extra: dict[str, Any],
    task: int = 0,
    tasks: int = 1,
    show_progress: bool = True,
    unit: str = "img",
) -> Outcome:
    """Write (or complete) task `task`'s shards of `out`; with one task also merge: sizes.json per
    split and manifest.json. `rejected` holds every split (in order) with what planning rejected."""
    out.mkdir(parents=True, exist_ok=True)
    for split in rejected:
        inside(out, split).mkdir(exist_ok=True)  # a split folder that resolves elsewhere is refused
    fp = fingerprint({"dataset": dataset, "shard_size": shard_size, **identity})
    old = _previous(out, fp, overwrite, tasks)
    mine = task_range([j.units for j in jobs], task, tasks)
    if old and tasks > 1:
        log.info("%s is complete already (%s): nothing to do for task %d", out, MANIFEST, task)
        return Outcome(old, task, tasks, mine, len(jobs), len(mine), 0)
    plan = {
        "fingerprint": fp,
        "dataset": dataset,
        "jobs": [[j.split, j.name] for j in jobs],
        "units": [j.units for j in jobs],
        "rejected": rejected,
        "identity": identity,
        "extra": extra,
    }
    # Through JSON and back, so that one process and a merge of N tasks build the manifest from equal values.
    plan = json.loads(json.dumps(plan, default=str))
    atomic_write_json(out / PARTS / PLAN, plan, durable=False)

    my_jobs = [jobs[i] for i in mine]
    known = _known(out, old, jobs)
    kept = [known[j.key] for j in my_jobs if j.key in known and _intact(out, known[j.key])]
    if kept:
        log.info("resuming: %d of %d shards already complete and verified", len(kept), len(my_jobs))
    _drop_stale_temporaries(out, my_jobs)
    done = {r.key for r in kept}
    todo = [j for j in my_jobs if j.key not in done]
    units = {j.key: j.units for j in todo}
    bar = progress(sum(j.units for j in my_jobs), f"{dataset} shards", unit, enabled=show_progress)
    bar.update(sum(j.units for j in my_jobs) - sum(units.values()))
    with _PartLog(out / PARTS / f"task-{task:05d}-of-{tasks:05d}.jsonl", kept) as part:
        for result in writers.run(todo):
            part.append(result)
            bar.update(units[result.key])
    bar.close()
    manifest = merge(out) if tasks == 1 else None
    return Outcome(manifest, task, tasks, mine, len(jobs), len(kept), len(todo))


class _PartLog:
    """A task's record of finished shards, one JSON line each. Opened by rewriting it with what was
    verified (so that a line torn by a kill is gone), then appended to after every shard's rename."""

    def __init__(self, path: Path, kept: list[ShardResult]) -> None:
        atomic_write_text(path, "".join(_line(r) for r in kept), durable=False)
        self.file = open(path, "a", encoding="utf-8")  # closed in __exit__

    def __enter__(self) -> _PartLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def append(self, result: ShardResult) -> None:
        self.file.write(_line(result))
        self.file.flush()  # not fsynced: it only guides a rerun, which re-hashes every shard it keeps


def _line(result: ShardResult) -> str:
    record = None if result.record is None else asdict(result.record)
    entry = {"split": result.split, "name": result.name, "record": record, "rejected": result.rejected}
    return json.dumps(entry) + "\n"


def _part_records(out: Path) -> tuple[dict[str, ShardResult], set[int]]:
    """Every shard recorded by any task (a later line wins), and the task counts the records used."""
    found: dict[str, ShardResult] = {}
    counts: set[int] = set()
    folder = out / PARTS
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        match = _PART.fullmatch(path.name)
        if not match:
            continue
        counts.add(int(match.group(2)))
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
                record = None if entry["record"] is None else ShardRecord(**entry["record"])
                result = ShardResult(entry["split"], entry["name"], record, list(entry["rejected"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line torn by a kill: that shard is redone
            found[result.key] = result
    return found, counts


def _known(out: Path, old: dict[str, Any], jobs: Sequence[Job]) -> dict[str, ShardResult]:
    """What earlier runs with this fingerprint finished: the manifest's shards, then the tasks' records."""
    by_key = {j.key: j for j in jobs}
    known: dict[str, ShardResult] = {}
    # Which shard a rejected sample belonged to: a dict for written shards (a manifest may list
    # thousands), the job's own test for the others. Built only when there is a manifest to read:
    # each of N tasks plans every sample.
    splits = old.get("splits", {})
    owner_of = {_item(s): j.key for j in jobs if isinstance(j, ShardJob) for s in j.samples} if splits else {}
    for split, entry in splits.items():
        for raw in entry["shards"]:
            job = by_key.get(f"{split}/{raw['name']}")
            if job is not None:
                mine = [
                    r
                    for r in entry.get("rejected", [])
                    if owner_of.get(str(r.get("item"))) == job.key
                    or (not isinstance(job, ShardJob) and job.owns(str(r.get("item"))))
                ]
                known[job.key] = ShardResult(split, job.name, ShardRecord(**raw), mine)
    records, _ = _part_records(out)
    known.update({k: r for k, r in records.items() if k in by_key})
    return known


def _shard_path(out: Path, result: ShardResult) -> Path:
    assert result.record is not None
    return Path(result.record.path) if result.record.path else out / result.split / result.name


def _intact(out: Path, result: ShardResult) -> bool:
    """A recorded shard is still what was recorded: same size, same sha256 (a skipped one is redone).
    A remote one (indexed at a URL) is asked for its size only: hashing it would download it again,
    and the trainer checks its sha256 as it streams it anyway."""
    if result.record is None:
        return False
    if is_remote(result.record.path):
        try:
            return remote_size(result.record.path) in (None, result.record.bytes)
        except UserError:
            return False  # gone or refused: redone, and reported as that shard's problem
    path = _shard_path(out, result)
    return (
        path.is_file()
        and path.stat().st_size == result.record.bytes
        and sha256_file(path) == result.record.sha256
    )


def _drop_stale_temporaries(out: Path, jobs: Sequence[Job]) -> None:
    """Temporaries left by a killed run of these shards: never a final name, safe to drop. Only this
    task's: a sibling task writing into the same folder keeps its own."""
    names: dict[str, set[str]] = {}
    for job in jobs:
        names.setdefault(job.split, set()).add(job.name)
    for split, mine in names.items():
        for path in (out / split).iterdir():
            if is_tmp_name(path.name) and path.name[1 : path.name.rfind(".tmp-")] in mine:
                path.unlink(missing_ok=True)


def _ours(out: Path) -> list[Path]:
    """Files in `out` with names this tool writes (shards, sizes.json, manifest, temporaries)."""
    found = [out / MANIFEST] if (out / MANIFEST).exists() else []
    for sub in sorted(p for p in out.iterdir() if p.is_dir() and p.name != PARTS) if out.is_dir() else []:
        for p in sub.iterdir():
            if p.is_file() and (_SHARD.fullmatch(p.name) or p.name == "sizes.json" or is_tmp_name(p.name)):
                found.append(p)
    return found


def _previous(out: Path, fp: str, overwrite: bool, tasks: int) -> dict[str, Any]:
    """The manifest of a finished run with this fingerprint, else {}. An output made from another
    config or other sources is refused unless `overwrite` (and never removed by one of N tasks:
    they would remove each other's fresh shards)."""
    manifest = read_json(out / MANIFEST) if (out / MANIFEST).exists() else {}
    plan = read_json(out / PARTS / PLAN) if (out / PARTS / PLAN).exists() else {}
    prints = {record.get("fingerprint") for record in (manifest, plan) if record}
    existing = _ours(out)
    if prints == {fp}:
        return manifest
    if not prints and not [p for p in existing if not is_tmp_name(p.name)]:
        return {}
    clash = (
        MANIFEST if manifest.get("fingerprint", fp) != fp else f"{PARTS}/{PLAN}" if plan else existing[0].name
    )
    if not overwrite:
        raise UserError(
            f"{out} already holds a different prep ({clash} was made from another config or other sources); "
            "pass --overwrite to replace it, or choose another --out"
        )
    if tasks > 1:
        raise UserError(
            f"{out} holds another prep, and --overwrite with --tasks > 1 would let the tasks delete each "
            "other's shards: remove it first (or choose another --out)"
        )
    for p in existing:
        p.unlink()
    shutil.rmtree(out / PARTS, ignore_errors=True)
    log.info("--overwrite: removed %d files of the earlier prep in %s", len(existing), out)
    return {}


# --------------------------------------------------------------------------- merging


def merge(out: Path) -> dict[str, Any]:
    """Write sizes.json per split and manifest.json from the tasks' records, once every shard of the
    plan is recorded and on disk at its recorded size; else one line naming the tasks to rerun."""
    plan_path = out / PARTS / PLAN
    if not plan_path.exists():
        if (out / MANIFEST).exists():
            return read_json(out / MANIFEST)  # merged already
        raise UserError(
            f"{out}: nothing to merge (no {PARTS}/{PLAN}): run the prep tasks first, with this --out"
        )
    plan = read_json(plan_path)
    records, counts = _part_records(out)
    keys = [f"{split}/{name}" for split, name in plan["jobs"]]
    missing = [i for i, key in enumerate(keys) if key not in records or not _present(out, records[key])]
    if missing:
        units = plan.get("units") or [1] * len(keys)  # a plan written before units were recorded
        raise UserError(_not_finished(out, keys, units, missing, counts))
    splits = {
        split: [records[f"{s}/{n}"] for s, n in plan["jobs"] if s == split] for split in plan["rejected"]
    }
    manifest = _manifest(plan, splits)
    for split in splits:
        sizes = {s["name"]: s["num_samples"] for s in manifest["splits"][split]["shards"]}
        atomic_write_json(out / split / "sizes.json", sizes, durable=False)
    atomic_write_json(out / MANIFEST, manifest, durable=False)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return manifest


def _present(out: Path, result: ShardResult) -> bool:
    if result.record is None or is_remote(result.record.path):
        return True  # recorded as skipped, or at a URL (a merge makes no network calls)
    path = _shard_path(out, result)
    return path.is_file() and path.stat().st_size == result.record.bytes


def _not_finished(out: Path, keys: list[str], units: list[int], missing: list[int], counts: set[int]) -> str:
    first = keys[missing[0]].split("/", 1)[1]
    what = f"{len(missing)} of {len(keys)} shards are not there yet (first: {first})"
    if len(counts) != 1:
        return f"{out}: {what}: run or rerun the prep tasks with this --out, then merge again"
    tasks = counts.pop()
    owners = sorted({owner(i, units, tasks) for i in missing})
    listed = ", ".join(map(str, owners))
    return (
        f"{out}: tasks {listed} of {tasks} have not finished: {what}; rerun them with --tasks {tasks} "
        f"--task K (on Slurm: TASKS={tasks} sbatch --array={','.join(map(str, owners))} launch/prep.sbatch), "
        "then merge again"
    )


def _manifest(plan: dict[str, Any], splits: dict[str, list[ShardResult]]) -> dict[str, Any]:
    records: dict[str, SplitRecord] = {}
    for split, results in splits.items():
        rejected = list(plan["rejected"][split]) + [r for res in results for r in res.rejected]
        shards = [res.record for res in results if res.record is not None]
        records[split] = SplitRecord(shards, sorted(rejected, key=lambda r: r["item"]))
    return {
        "format_version": FORMAT_VERSION,
        "dataset": plan["dataset"],
        "complete": True,
        "fingerprint": plan["fingerprint"],
        "created_by": f"data_prep {__version__}",
        "splits": {name: rec.to_dict() for name, rec in records.items()},
        **plan["extra"],
        **plan["identity"],
    }


# --------------------------------------------------------------------------- reporting


def skipped(manifest: dict[str, Any]) -> Counter[str]:
    """Rejected items by kind, over every split and the top-level list."""
    entries = [r for s in manifest["splits"].values() for r in s["rejected"]] + list(
        manifest.get("rejected", [])
    )
    return Counter(str(r.get("kind") or r.get("reason", "other")) for r in entries)


def summary(manifest: dict[str, Any], out: Path) -> str:
    """The closing line: samples per split, then what was skipped by kind (`2 skipped: 1 missing file,
    1 unreadable image`)."""
    parts = [
        f"{name} {s['num_samples']} samples in {s['num_shards']} shards"
        for name, s in manifest["splits"].items()
    ]
    total = sum(s["num_samples"] for s in manifest["splits"].values())
    counts = skipped(manifest)
    tail = ""
    if counts:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
        tail = f"; {sum(counts.values())} skipped: {kinds}"
    return f"{manifest['dataset']} → {out}: {total} samples ({', '.join(parts)}){tail} (details in {out / MANIFEST})"
