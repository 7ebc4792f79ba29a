"""Read Flickr8k as users hold it: the official zips, their extracted folders, or the Kaggle layout.

Official (../shared/notes/formats.md): `Flickr8k_Dataset.zip` → `Flicker8k_Dataset/*.jpg` (sic);
`Flickr8k_text.zip` → `Flickr8k.token.txt` (`<image>.jpg#<n>\\t<caption>`, n = 0..4) and the split
lists `Flickr_8k.{train,dev,test}Images.txt`. Kaggle: `Images/` + `captions.txt` (CSV `image,caption`).
Zip members are read in place, never extracted, so a hostile member name cannot write anywhere.
"""

from __future__ import annotations

import csv
import io
import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from data_prep.images import ImageRef, ignored_member, unsafe_member
from data_prep.samples import UNSAFE_PATH
from data_prep.shards import SourceInfo, describe_source, folder_info, rejection
from plumbing.errors import UserError

TOKEN_FILE = "Flickr8k.token.txt"
KAGGLE_CAPTIONS = "captions.txt"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "dev": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
IMAGE_SUFFIXES = (".jpg", ".jpeg")


# --------------------------------------------------------------------------- images


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
                rejection(ref.member, "duplicate", f"duplicate image name {name} (kept {refs[name].member})")
            )
        else:
            refs[name] = ref

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                pure = PurePosixPath(member.filename)
                if member.is_dir() or ignored_member(pure) or not pure.name.lower().endswith(IMAGE_SUFFIXES):
                    continue
                if unsafe_member(member.filename):
                    rejected.append(
                        rejection(
                            member.filename, UNSAFE_PATH, "unsafe member name (absolute or ../), not read"
                        )
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


def _named_texts(path: Path) -> dict[str, tuple[str, str]]:
    """basename → (where, text) for the caption and split files in a zip, under a folder, or beside
    a file (its siblings only: a token file's folder may also hold the 8,000 images)."""
    wanted = {TOKEN_FILE, KAGGLE_CAPTIONS, *SPLIT_FILES.values()}
    found: dict[str, tuple[str, str]] = {}
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                pure = PurePosixPath(member.filename)
                if pure.name in wanted and not ignored_member(pure) and not member.is_dir():
                    found.setdefault(pure.name, (f"{path}:{member.filename}", _decode(archive.read(member))))
        return found
    files = sorted(path.rglob("*.txt")) if path.is_dir() else sorted(path.parent.glob("*.txt"))
    for file in files:
        if file.name in wanted and not ignored_member(PurePosixPath(file.as_posix())):
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
