"""Read Flickr8k as users hold it: the official zips, their extracted folders, or the Kaggle layout.

Official (../shared/notes/formats.md): `Flickr8k_Dataset.zip` → `Flicker8k_Dataset/*.jpg` (sic);
`Flickr8k_text.zip` → `Flickr8k.token.txt` (`<image>.jpg#<n>\\t<caption>`, n = 0..4) and the split
lists `Flickr_8k.{train,dev,test}Images.txt`. Kaggle: `Images/` + `captions.txt` (CSV `image,caption`).
Zip members are read in place, never extracted, so a hostile member name cannot write anywhere.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from data_prep.shards import Reject, SourceInfo, describe_source, folder_info
from plumbing.errors import UserError

TOKEN_FILE = "Flickr8k.token.txt"
KAGGLE_CAPTIONS = "captions.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
# Without split lists: a split from a hash of the image name, stable when images are added or removed.
HASH_SPLIT = (("train", 750), ("dev", 875), ("test", 1000))  # cumulative per-mille
IMAGE_SUFFIXES = (".jpg", ".jpeg")


def _ignored(member: PurePosixPath) -> bool:
    """macOS zips carry __MACOSX/ and ._name AppleDouble files beside the real ones."""
    return "__MACOSX" in member.parts or member.name.startswith("._")


def _unsafe(name: str) -> bool:
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or ":" in name


# --------------------------------------------------------------------------- images


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a zip member or a file. Small, so it travels to workers cheaply."""

    container: str  # the zip path, or "" for a plain file
    member: str  # member name inside the zip, or the file path

    def read(self) -> bytes:
        if not self.container:
            with open(self.member, "rb") as f:
                return f.read()
        return _zip(self.container).read(self.member)


_OPEN_ZIPS: dict[str, zipfile.ZipFile] = {}


def _zip(path: str) -> zipfile.ZipFile:
    """One open handle per zip per process (workers open their own)."""
    if path not in _OPEN_ZIPS:
        _OPEN_ZIPS[path] = zipfile.ZipFile(path)
    return _OPEN_ZIPS[path]


@dataclass
class ImageIndex:
    refs: dict[str, ImageRef]
    rejected: list[dict[str, str]]
    info: SourceInfo


def index_images(path: Path) -> ImageIndex:
    """Image name (e.g. 1000268201_693b08cb0e.jpg) → where its bytes are."""
    if not path.exists():
        raise UserError(
            f"{path}: no such file or folder (expected Flickr8k_Dataset.zip, Flicker8k_Dataset/ or Images/)"
        )
    refs: dict[str, ImageRef] = {}
    rejected: list[dict[str, str]] = []

    def add(name: str, ref: ImageRef) -> None:
        if name in refs:
            rejected.append(
                {"item": ref.member, "reason": f"duplicate image name {name} (kept {refs[name].member})"}
            )
        else:
            refs[name] = ref

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                pure = PurePosixPath(member.filename)
                if member.is_dir() or _ignored(pure) or not pure.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if _unsafe(member.filename):
                    rejected.append(
                        {"item": member.filename, "reason": "unsafe member name (absolute or ../), not read"}
                    )
                    continue
                add(pure.name, ImageRef(str(path.resolve()), member.filename))
        info = describe_source(path, digests=("sha256",))
    elif path.is_dir():
        folder = next(
            (path / n for n in ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images") if (path / n).is_dir()),
            path,
        )
        base = folder.resolve()
        with os.scandir(base) as entries:
            files = sorted((e.name, e.stat().st_size) for e in entries if e.is_file())
        for name, _ in files:
            if name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith("._"):
                add(name, ImageRef("", os.path.join(base, name)))
        info = folder_info(folder, files)
    else:
        raise UserError(f"{path}: not a zip archive or a folder of JPEGs")
    if not refs:
        raise UserError(f"{path}: holds no .jpg images")
    return ImageIndex(refs, rejected, info)


# --------------------------------------------------------------------------- captions and splits


@dataclass
class CaptionFile:
    by_image: dict[str, list[str]]
    where: str
    info: SourceInfo
    splits: dict[str, list[str]] = field(default_factory=dict)
    split_source: str = ""


def read_captions(path: Path) -> CaptionFile:
    """Captions from Flickr8k_text.zip, its folder, Flickr8k.token.txt, or Kaggle's captions.txt."""
    if not path.exists():
        raise UserError(
            f"{path}: no such file or folder (expected Flickr8k_text.zip, {TOKEN_FILE} or {KAGGLE_CAPTIONS})"
        )
    texts = _named_texts(path)
    for name in (TOKEN_FILE, KAGGLE_CAPTIONS):
        if name in texts:
            where, text = texts[name]
            break
    else:
        if path.is_file() and not zipfile.is_zipfile(path):
            where, text = str(path), _decode(path.read_bytes())
        else:
            raise UserError(f"{path}: holds neither {TOKEN_FILE} nor {KAGGLE_CAPTIONS}")
    by_image = _parse_csv(text, where) if text.startswith("image,caption") else _parse_tokens(text, where)
    if not by_image:
        raise UserError(f"{where}: holds no captions")
    splits, split_source = _splits(texts, path, required=False)
    return CaptionFile(by_image, where, describe_source(path, digests=("sha256",)), splits, split_source)


def read_splits(path: Path) -> tuple[dict[str, list[str]], str]:
    """The official split lists in a zip, a folder, or beside a file."""
    if not path.exists():
        raise UserError(f"{path}: no such file or folder (expected the Flickr_8k.*Images.txt split lists)")
    return _splits(_named_texts(path), path, required=True)


def _splits(
    texts: dict[str, tuple[str, str]], path: Path, required: bool
) -> tuple[dict[str, list[str]], str]:
    found = {split: texts[name] for split, name in SPLIT_FILES.items() if name in texts}
    if not found:
        if required:
            raise UserError(f"{path}: holds none of {', '.join(SPLIT_FILES.values())}")
        return {}, ""
    missing = [SPLIT_FILES[s] for s in SPLIT_FILES if s not in found]
    if missing:
        raise UserError(
            f"{path}: has {', '.join(SPLIT_FILES[s] for s in found)} but not {', '.join(missing)}"
        )
    splits = {}
    for split, (_, text) in found.items():
        names = [line.strip() for line in text.splitlines() if line.strip()]
        splits[split] = list(dict.fromkeys(names))  # a name listed twice is one sample
    return splits, str(path)


def hash_split(names: list[str]) -> dict[str, list[str]]:
    """The documented split used when no split lists exist: sha1(name) per mille → 75/12.5/12.5 %."""
    splits: dict[str, list[str]] = {s: [] for s, _ in HASH_SPLIT}
    for name in sorted(names):
        bucket = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % 1000
        splits[next(s for s, limit in HASH_SPLIT if bucket < limit)].append(name)
    return splits


def _named_texts(path: Path) -> dict[str, tuple[str, str]]:
    """basename → (where, text) for the caption and split files in a zip, under a folder, or beside
    a file (its siblings only: a token file's folder may also hold the 8,000 images)."""
    wanted = {TOKEN_FILE, KAGGLE_CAPTIONS, *SPLIT_FILES.values()}
    found: dict[str, tuple[str, str]] = {}
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                pure = PurePosixPath(member.filename)
                if pure.name in wanted and not _ignored(pure) and not member.is_dir():
                    found.setdefault(pure.name, (f"{path}:{member.filename}", _decode(archive.read(member))))
        return found
    files = sorted(path.rglob("*.txt")) if path.is_dir() else sorted(path.parent.glob("*.txt"))
    for file in files:
        if file.name in wanted and not _ignored(PurePosixPath(file.as_posix())):
            found.setdefault(file.name, (str(file), _decode(file.read_bytes())))
    return found


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


_TOKEN_LINE = re.compile(r"^([^\t\n]*)#(\d+)\t([^\n]*)$", re.M)


def _parse_tokens(text: str, where: str) -> dict[str, list[str]]:
    """`<image>#<n>\\t<caption>` lines → image → captions in n order. A regex over the whole text
    (40,460 lines in ~10 ms); the line-by-line walk only runs to name a malformed line."""
    matches = _TOKEN_LINE.findall(text)
    if len(matches) == sum(1 for line in text.splitlines() if line.strip()):
        numbered: dict[str, dict[int, str]] = {}
        for name, number, caption in matches:
            numbered.setdefault(name.strip(), {})[int(number)] = caption.strip()
        return {name: [c for _, c in sorted(caps.items())] for name, caps in numbered.items()}
    numbered = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        left, tab, caption = line.partition("\t")
        name, hash_, number = left.strip().rpartition("#")
        if not tab or not hash_ or not name or not number.isdigit():
            raise UserError(f"{where}:{lineno}: expected '<image>.jpg#<n><TAB><caption>', got {line[:60]!r}")
        numbered.setdefault(name, {})[int(number)] = caption.strip()
    return {name: [c for _, c in sorted(caps.items())] for name, caps in numbered.items()}


def _parse_csv(text: str, where: str) -> dict[str, list[str]]:
    by_image: dict[str, list[str]] = {}
    reader = csv.reader(io.StringIO(text))
    next(reader)  # header image,caption
    for row in reader:
        if not row:
            continue
        if len(row) != 2 or not row[0].strip():
            raise UserError(f"{where}:{reader.line_num}: expected 2 CSV fields image,caption, got {len(row)}")
        by_image.setdefault(row[0].strip(), []).append(row[1].strip())
    return by_image


# --------------------------------------------------------------------------- samples


@dataclass(frozen=True)
class FlickrImage:
    """One image with its captions, built into WebDataset members inside a shard-writing worker."""

    key: str
    name: str
    split: str
    ref: ImageRef
    captions: tuple[str, ...]
    resize: int  # 0 keeps the original bytes
    full_decode: bool

    def members(self) -> dict[str, bytes]:
        try:
            data = self.ref.read()
        except (OSError, KeyError, zipfile.BadZipFile) as err:
            raise Reject(f"cannot read the image ({err})") from None
        data = check_jpeg(data, self.resize, self.full_decode)
        meta = {"image": self.name, "split": self.split, "captions": list(self.captions)}
        return {
            "jpg": data,
            "txt": self.captions[0].encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }


# Markers without a length field (TEM, RST0-7, SOI) and the frame headers that give the image size.
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}
_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_problem(data: bytes) -> str | None:
    """Why `data` is not a complete JPEG, or None: walks the markers (ITU T.81 §B.1) up to the first
    scan and looks for the end-of-image marker after it. Catches truncated files, other formats and
    broken headers in ~5 µs; scan data corrupted in place is left to the trainer's decode, which
    skips and counts such a sample."""
    if data[:2] != b"\xff\xd8":
        return "not a JPEG (no start-of-image marker)"
    pos, n, frame = 2, len(data), False
    while True:
        if pos + 4 > n:
            return "truncated in the headers"
        if data[pos] != 0xFF:
            return f"broken marker at byte {pos}"
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker == 0xD9:
            return "no image data before the end marker"
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > n:
            return "truncated (a header segment runs past the end)"
        if marker in _FRAMES:
            height, width = (
                int.from_bytes(data[pos + 5 : pos + 7], "big"),
                int.from_bytes(data[pos + 7 : pos + 9], "big"),
            )
            if not (height and width):
                return "frame header with zero size"
            frame = True
        if marker == 0xDA:
            break
        pos += 2 + length
    if not frame:
        return "no frame header before the scan"
    if data.rfind(b"\xff\xd9", max(pos, n - 4096)) < 0:
        return "truncated (no end-of-image marker)"
    return None


def check_jpeg(data: bytes, resize: int = 0, full_decode: bool = False) -> bytes:
    """The bytes unchanged if they are a complete JPEG (or re-encoded with the long side ≤ `resize`)."""
    problem = jpeg_problem(data)
    if problem:
        raise Reject(f"JPEG does not decode: {problem}")
    if not (resize or full_decode):
        return data
    try:
        with Image.open(io.BytesIO(data)) as image:
            if not resize:
                # 1/8-scale DCT decoding still walks every entropy-coded block: broken scans fail here.
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
                image.load()
                return data
            image = image.convert("RGB")
            if max(image.size) > resize:
                image.thumbnail((resize, resize), Image.Resampling.BICUBIC)
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=95)
            return out.getvalue()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise Reject(f"JPEG does not decode ({err})") from None


def sample_key(name: str) -> str:
    """WebDataset splits a key at its first dot, so the key is the name without extension and dots."""
    stem = name.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem[1:] else stem
    return stem.replace(".", "_")
