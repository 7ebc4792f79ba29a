"""The output folder of a sampling job, and what keeps it consistent through kills and reruns.

    out/images/<id>_<k>.png     written under a temporary name, then renamed
    out/parts/<slice>.jsonl     one record per finished image, appended after its PNG is in place
    out/manifest.jsonl          all records of the requested images, merged from the parts
    out/contact_sheet.png       a grid of the first images; out/tensorboard/; out/shards/ (optional)

The records follow core.records: a record is appended only after its image is complete, so the
manifest never lists an image that is not; a rerun keeps every image whose record and sha256 check
out and makes the rest. Paths come from item ids that passed `safe_name`, and are checked to stay
inside out/.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.records import Record, Records
from core.sheets import contact_sheet
from plumbing.errors import UserError
from plumbing.files import atomic_write_bytes, inside, safe_name, sha256_file, tmp_name
from plumbing.tars import write_tar

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class OutputFolder:
    root: Path

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def records(self) -> Records:
        return Records(self.root, MANIFEST, key=lambda r: (r["id"], r["k"]), check=self._intact)

    def prepare(self) -> None:
        for folder in (self.images, self.root / "parts"):
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
        except UserError as err:
            raise type(err)(f"{err}; the images written so far are kept, rerun to finish") from None
        return hashlib.sha256(data).hexdigest()

    def _intact(self, record: Record) -> bool:
        path = self.root / record["file"]
        return path.is_file() and sha256_file(path) == record["sha256"]

    def contact_sheet(self, records: list[Record], limit: int) -> Path | None:
        if not records or limit == 0:
            return None
        shown = records[:limit]
        cells = [(Image.open(self.root / r["file"]), r["prompt"]) for r in shown]
        side = max(128, max(max(im.size) for im, _ in cells))  # small images enlarged, pixels kept
        return contact_sheet(self.root / "contact_sheet.png", cells, side=side, lines=3)

    def shards(self, records: list[Record], per_shard: int = 1000) -> list[Path]:
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
