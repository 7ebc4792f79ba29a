"""manifest.json: the contract between data_prep (which writes it) and every stage that reads shards.

A manifest lists, per split, every shard with its sample count, size and sha256, so a reader can
check the data before training and knows every epoch's length without opening a tar. Its
`format_version` is checked on load: a manifest from an older or newer data_prep is one line.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.remote import is_remote, open_shard, remote_size
from core.secrets import redact
from plumbing.errors import UserError
from plumbing.files import read_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardRecord:
    name: str
    num_samples: int
    bytes: int
    sha256: str
    path: str = ""
    """Where the shard is, for shards indexed in place (`data_prep index`): a path, an http(s) URL, a
    `pipe:` command or an fsspec URL (core.remote), as given; empty: <root>/<split>/<name>."""


@dataclass
class SplitRecord:
    shards: list[ShardRecord]
    rejected: list[dict[str, str]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "num_shards": len(self.shards),
            "shards": [{k: v for k, v in asdict(s).items() if k != "path" or v} for s in self.shards],
            "rejected": self.rejected,
        }


@dataclass
class Manifest:
    """The parsed manifest; `root` is the folder that holds it (shards live in root/<split>/)."""

    root: Path
    dataset: str
    fingerprint: str
    splits: dict[str, SplitRecord]
    classes: list[str]
    raw: dict[str, Any]

    def shard_location(self, split: str, shard: ShardRecord) -> str:
        """<root>/<split>/<name> for the shards data_prep wrote; an indexed shard's own path or URL."""
        if is_remote(shard.path):
            return shard.path
        return str(self.root / shard.path if shard.path else self.root / split / shard.name)

    def split(self, name: str) -> SplitRecord:
        if name not in self.splits:
            raise UserError(f"{self.root / MANIFEST}: no split {name!r} (it has {', '.join(self.splits)})")
        return self.splits[name]


def load_manifest(path: Path) -> Manifest:
    """Parse `path` (the manifest file or its folder); a malformed one is a one-line error."""
    file = path / MANIFEST if path.is_dir() else path
    raw = read_json(file)
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != FORMAT_VERSION:
        raise UserError(
            f"{file}: manifest format_version {version!r}, this harness reads {FORMAT_VERSION}: "
            "rerun data_prep to rewrite it (the shards it keeps are reused)"
        )
    try:
        splits = {
            name: SplitRecord([ShardRecord(**s) for s in split["shards"]], list(split.get("rejected", [])))
            for name, split in raw["splits"].items()
        }
        return Manifest(
            file.parent, raw["dataset"], raw["fingerprint"], splits, list(raw.get("classes", [])), raw
        )
    except (KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{file}: not a data_prep manifest (bad or missing key {err})") from None


def verify_shards(manifest: Manifest, split: str, checksum: bool = True) -> None:
    """Every shard of `split` exists with its recorded size (and sha256): else one line naming it.
    Remote shards are asked for their size (HTTP HEAD, fsspec's info: a few at a time); a `pipe:`
    command's output has no size before it runs, and is checked as the loader streams it."""
    shards = manifest.split(split).shards
    locations = [manifest.shard_location(split, s) for s in shards]
    remote = [i for i, where in enumerate(locations) if is_remote(where)]
    sizes: dict[int, int | None] = {}
    with ThreadPoolExecutor(8) as pool:  # round trips overlap; the local files are stat()ed meanwhile
        asked = dict(zip(remote, pool.map(remote_size, [locations[i] for i in remote])))
        for i, where in enumerate(locations):
            if i in asked:
                sizes[i] = asked[i]
            elif not Path(where).is_file():
                raise UserError(f"shard {where} is named in {manifest.root / MANIFEST} but missing")
            else:
                sizes[i] = Path(where).stat().st_size
    for i, shard in enumerate(shards):
        where = redact(locations[i])
        if sizes[i] is not None and sizes[i] != shard.bytes:
            raise UserError(
                f"shard {where} has {sizes[i]} bytes, the manifest says {shard.bytes} (truncated or replaced?)"
            )
        if checksum and _sha256(locations[i]) != shard.sha256:
            raise UserError(f"shard {where}: sha256 does not match the manifest (corrupted or replaced?)")


def _sha256(location: str) -> str:
    digest = hashlib.sha256()
    with open_shard(location) as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
