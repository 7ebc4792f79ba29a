"""What retrieval reads: images (files, folders, globs, or a data_prep split) and texts (caption banks
and queries: .txt, .jsonl, or the captions of a data_prep split)."""

from __future__ import annotations

import glob
import hashlib
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image

from core.manifest import load_manifest
from core.shards import captions_of, image_bytes, read_split, rgb_or_none
from plumbing.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class ImageItem:
    id: str
    source: str  # a file path, or shard:key
    captions: tuple[str, ...] = ()  # known for data_prep splits: the ground truth of hit rates


@dataclass(frozen=True)
class Text:
    id: str
    text: str
    image: str = ""  # the image this text belongs to, when known


@dataclass
class ImageSet:
    items: list[ImageItem]
    fingerprint: str  # changes when any image changes: keys the embedding cache
    home: Path  # where a cache of their embeddings goes by default
    manifest: Path | None = None
    split: str = ""

    def pictures(self, items: list[ImageItem]) -> Iterator[tuple[ImageItem, Image.Image | None]]:
        """Each item with its picture, or None when it cannot be read or decoded (the caller skips it)."""
        if self.manifest is not None:
            by_key = {item.id: item for item in items}
            for key, picture in iter_manifest(self.manifest, self.split, set(by_key)):
                yield by_key[key], picture
            return
        in_tars: dict[str, dict[str, ImageItem]] = {}
        for item in items:
            if Path(item.source).suffix.lower() in IMAGE_SUFFIXES:
                yield item, rgb_or_none(item.source)
            else:  # a sample of a WebDataset shard: read below, a shard at a time
                shard, key = item.source.rsplit(":", 1)
                in_tars.setdefault(shard, {})[key] = item
        for shard, wanted in in_tars.items():
            for key, data in _tar_images(Path(shard)):
                if key in wanted:
                    yield wanted.pop(key), rgb_or_none(data)
            yield from ((item, None) for item in wanted.values())


def picture_of(source: str, manifest: Path | None, split: str) -> Image.Image | None:
    """One picture by its `source` (a file, shard:key of a WebDataset shard, or of a manifest split)."""
    if Path(source).suffix.lower() in IMAGE_SUFFIXES:
        return rgb_or_none(source)
    shard, key = source.rsplit(":", 1)
    if manifest is not None:
        return next((p for _, p in iter_manifest(manifest, split, {key})), None)
    return next((rgb_or_none(data) for k, data in _tar_images(Path(shard)) if k == key), None)


def _tar_images(path: Path) -> Iterator[tuple[str, bytes]]:
    """(key, image bytes) of every sample with an image member in a WebDataset shard."""
    try:
        for sample in wds.tariterators.tarfile_samples(iter([{"url": str(path)}])):
            data = image_bytes(sample)
            if data is not None:
                yield sample["__key__"], data
    except (OSError, tarfile.TarError) as err:
        raise UserError(f"{path}: not a readable WebDataset shard ({err})") from None


def image_files(patterns: list[str]) -> ImageSet:
    """Image files, folders and globs; WebDataset shards (.tar) count as folders of their samples."""
    paths: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if glob.has_magic(pattern):
            found = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in (*IMAGE_SUFFIXES, ".tar"))
        elif path.is_file():
            found = [path]
        else:
            raise UserError(f"images: {pattern!r}: no such file, folder or glob")
        paths += [
            p
            for p in found
            if p.is_file() and p.suffix.lower() in (*IMAGE_SUFFIXES, ".tar") and p not in paths
        ]
    items: list[ImageItem] = []
    digest = hashlib.sha256()
    for p in paths:
        stat = p.stat()
        digest.update(f"{p.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
        if p.suffix.lower() == ".tar":
            items += [ImageItem(f"{p.name}/{key}", f"{p}:{key}") for key, _ in _tar_images(p)]
        else:
            items.append(ImageItem(str(p), str(p)))
    if not items:
        raise UserError(f"images: {' '.join(patterns)} hold no .jpg/.png images")
    home = Path(patterns[0]) if Path(patterns[0]).is_dir() else paths[0].parent
    return ImageSet(items, digest.hexdigest(), home)


def manifest_images(path: str, split: str) -> ImageSet:
    manifest = load_manifest(Path(path))
    record = manifest.split(split)
    items = [
        ImageItem(key, f"{shard}:{key}", captions)
        for key, shard, captions, _ in _samples(path, split, with_images=False)
    ]
    digest = hashlib.sha256("".join(s.sha256 for s in record.shards).encode()).hexdigest()
    return ImageSet(items, digest, manifest.root, manifest.root, split)


def iter_manifest(path: Path, split: str, wanted: set[str]) -> Iterator[tuple[str, Image.Image | None]]:
    """(key, picture or None when it does not decode) for the wanted keys, in manifest order."""
    for key, _, _, data in _samples(str(path), split, with_images=True):
        if key in wanted:
            yield key, rgb_or_none(data)


def _samples(path: str, split: str, with_images: bool) -> Iterator[tuple[str, str, tuple[str, ...], bytes]]:
    """(key, shard name, captions, image bytes if asked) of every sample of a prepared split."""
    for sample in read_split(load_manifest(Path(path)), split):
        data = (image_bytes(sample) or b"") if with_images else b""
        yield sample["__key__"], Path(sample["__url__"]).name, tuple(captions_of(sample)), data


def read_texts(patterns: list[str], bank_split: str = "train", kind: str = "bank") -> tuple[list[Text], str]:
    """Texts from .txt/.jsonl files or a data_prep manifest, and a fingerprint of their content."""
    texts: list[Text] = []
    for pattern in patterns:
        files = [Path(p) for p in sorted(glob.glob(pattern))] if glob.has_magic(pattern) else [Path(pattern)]
        for path in files:
            if not path.exists():
                raise UserError(f"{kind}: {path}: no such file")
            if path.name == "manifest.json" or path.is_dir():
                for key, _, captions, _ in _samples(str(path), bank_split, with_images=False):
                    texts += [Text(f"{key}#{n}", c, key) for n, c in enumerate(captions)]
            elif path.suffix == ".jsonl":
                texts += _jsonl(path, kind)
            else:
                for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                    if line.strip() and not line.lstrip().startswith("#"):
                        texts.append(Text(f"{path.name}:{lineno}", line.strip()))
    if not texts:
        raise UserError(f"{kind}: {' '.join(patterns)} hold no texts (an empty {kind})")
    seen: set[str] = set()
    for t in texts:
        if t.id in seen:
            raise UserError(f"{kind}: id {t.id!r} appears twice")
        seen.add(t.id)
    digest = hashlib.sha256("\n".join(f"{t.id}\t{t.text}" for t in texts).encode()).hexdigest()
    return texts, digest


def _jsonl(path: Path, kind: str) -> list[Text]:
    texts = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{lineno}: not valid JSON ({err.msg})") from None
        text = (
            record.get("caption") or record.get("query") or record.get("text")
            if isinstance(record, dict)
            else None
        )
        if not isinstance(text, str) or not text.strip():
            raise UserError(f'{path}:{lineno}: expected {{"caption" (or "query"): "…"}}')
        texts.append(
            Text(str(record.get("id", f"{path.name}:{lineno}")), text.strip(), str(record.get("image", "")))
        )
    return texts
