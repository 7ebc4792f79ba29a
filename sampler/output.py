"""The output folder of a sampling job, and what keeps it consistent through kills and reruns.

    out/images/<id>_<k>.png     written under a temporary name, then renamed
    out/parts/<slice>.jsonl     one record per finished image, appended after its PNG is in place
    out/manifest.jsonl          all records of the requested images, merged from the parts
    out/contact_sheet.png       a grid of the first images; out/tensorboard/; out/shards/ (optional)

A record is appended (and flushed to disk) only after its image is complete, so the manifest never
lists an image that is not; a rerun keeps every image whose record and sha256 check out and makes
the rest. Paths come from item ids that passed `safe_name`, and are checked to stay inside out/.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from plumbing.errors import UserError
from plumbing.files import atomic_write_bytes, atomic_write_text, inside, safe_name, sha256_file, tmp_name
from plumbing.tars import write_tar

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class OutputFolder:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def parts(self) -> Path:
        return self.root / "parts"

    def prepare(self) -> None:
        for folder in (self.images, self.parts):
            folder.mkdir(parents=True, exist_ok=True)
        for stale in self.images.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a killed run: never under a final name

    def image_path(self, item_id: str, k: int) -> Path:
        return inside(self.images, f"{safe_name(item_id, 120)}_{k}.png")

    def save_image(self, image: Image.Image, path: Path) -> str:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        data = buffer.getvalue()
        try:
            atomic_write_bytes(path, data)
        except OSError as err:
            hint = " (disk full?)" if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
            raise UserError(
                f"cannot write {path}: {err.strerror}{hint}; the images written so far are kept, rerun to finish"
            ) from None

        return hashlib.sha256(data).hexdigest()

    def append(self, part: str, record: dict[str, Any]) -> None:
        """One line, flushed and fsynced: a kill leaves at most an unfinished last line, ignored."""
        path = self.parts / f"{part}.jsonl"
        line = json.dumps(record, sort_keys=True) + "\n"
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
        except OSError as err:
            raise UserError(f"cannot record an image in {path}: {err.strerror}; rerun to finish") from None

    def records(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Every complete record whose image exists with its recorded sha256, newest last per image."""
        found: dict[tuple[str, int], dict[str, Any]] = {}
        for part in sorted(self.parts.glob("*.jsonl")):
            for line in part.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the unfinished last line of a killed writer
                found[(record["id"], record["k"])] = record
        return {key: r for key, r in found.items() if self._intact(r)}

    def _intact(self, record: dict[str, Any]) -> bool:
        path = self.root / record["file"]
        return path.is_file() and sha256_file(path) == record["sha256"]

    def merge(self, wanted: Iterable[tuple[str, int]]) -> list[dict[str, Any]]:
        """manifest.jsonl: the records of the requested images that are done, in (id, k) order.

        Array tasks merge as they finish; the lock orders their merges, so the last one to take it
        (which started after every task had appended its records) writes the complete manifest."""
        with open(self.root / ".merge.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            records = self.records()
            merged = [records[key] for key in sorted(set(wanted)) if key in records]
            atomic_write_text(
                self.root / MANIFEST, "".join(json.dumps(r, sort_keys=True) + "\n" for r in merged)
            )
        return merged

    def contact_sheet(self, records: list[dict[str, Any]], limit: int) -> Path | None:
        if not records or limit == 0:
            return None
        shown = records[:limit]
        images = [Image.open(self.root / r["file"]).convert("RGB") for r in shown]
        cell = max(max(im.size) for im in images)
        cols = math.ceil(math.sqrt(len(images)))
        rows = math.ceil(len(images) / cols)
        label = 12
        sheet = Image.new("RGB", (cols * cell, rows * (cell + label)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (im, record) in enumerate(zip(images, shown)):
            x, y = (i % cols) * cell, (i // cols) * (cell + label)
            sheet.paste(im, (x, y))
            draw.text((x + 2, y + cell), record["prompt"][: max(4, cell // 6)], fill="black")
        path = self.root / "contact_sheet.png"
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def shards(self, records: list[dict[str, Any]], per_shard: int = 1000) -> list[Path]:
        folder = self.root / "shards"
        folder.mkdir(exist_ok=True)
        paths = []
        for index, start in enumerate(range(0, len(records), per_shard)):
            members = []
            for record in records[start : start + per_shard]:
                key = f"{record['id']}_{record['k']}".replace(".", "_")
                members.append((f"{key}.json", json.dumps(record, sort_keys=True).encode()))
                members.append((f"{key}.png", (self.root / record["file"]).read_bytes()))
            path = folder / f"samples-{index:06d}.tar"
            tmp = tmp_name(path)
            write_tar(str(tmp), members)
            os.replace(tmp, path)
            paths.append(path)
        return paths
