"""The output records of a bulk job (sampling, captioning, search), kept consistent through kills,
reruns, ranks and Slurm array tasks:

    out/parts/<part>.jsonl    one file per process, append-only; each line is a finished item
    out/<manifest>.jsonl      the records of the requested items, merged from the parts, in order

A record is appended (and fsynced) only after the work it describes is complete, so nothing is
listed that is not done. A process killed mid-line leaves a torn last line: readers discard it and
its writer cuts it off before appending again, so the item is simply redone. Records are checked
(`check`, e.g. "its image exists with this sha256") before they count as done. Merges take a file
lock: array tasks finishing together write one manifest after the other, and the last one to take
the lock sees every task's records.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

from plumbing.files import atomic_write_text, write_failed

Record = dict[str, Any]


class PartWriter:
    """Appends records to one part file; opened once per process."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        _cut_torn_tail(path)

    def append(self, records: list[Record]) -> None:
        """The records as whole lines, flushed and fsynced before returning."""
        if not records:
            return
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise write_failed(self.path, err, then="rerun to finish") from None


def _cut_torn_tail(path: Path) -> None:
    """Drop an unfinished last line (a writer killed mid-write) so the next append starts a new line."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end != len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
            os.fsync(f.fileno())


class Records:
    """The parts of `root` and the manifest merged from them. `key` names an item (e.g. its id);
    `check` says whether a record's work is really there (default: it is)."""

    def __init__(
        self,
        root: Path,
        manifest: str,
        key: Callable[[Record], Hashable],
        check: Callable[[Record], bool] = lambda _r: True,
    ) -> None:
        self.root, self.manifest, self.key, self.check = root, root / manifest, key, check
        self.parts = root / "parts"

    def writer(self, part: str) -> PartWriter:
        return PartWriter(self.parts / f"{part}.jsonl")

    def done(self) -> dict[Hashable, Record]:
        """Every complete, checked record by key: of the records of one item, the last that passes
        `check` (a stale record of an earlier run never hides a good one)."""
        found: dict[Hashable, list[Record]] = {}
        for part in sorted(self.parts.glob("*.jsonl")) if self.parts.is_dir() else []:
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    key = self.key(record)
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # a torn last line, or not one of our records
                found.setdefault(key, []).append(record)
        done: dict[Hashable, Record] = {}
        for key, records in found.items():
            good = next((r for r in reversed(records) if self.check(r)), None)
            if good is not None:
                done[key] = good
        return done

    def merge(self, order: Iterable[Hashable]) -> list[Record]:
        """The manifest: the done records of the items in `order`, in that order, written atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".merge.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            done = self.done()
            merged = [done[key] for key in dict.fromkeys(order) if key in done]
            atomic_write_text(self.manifest, "".join(json.dumps(r, sort_keys=True) + "\n" for r in merged))
        return merged
