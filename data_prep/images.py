"""Images as users bring them: where the bytes are (a file or a zip member), whether they are a whole
image, and the size they are written at.

Kept as they are (unless resized): JPEG, PNG and WebP, the formats WebDataset readers decode by
extension (`jpg`, `png`, `webp`; core.shards reads all three). Each is checked by its structure,
which is cheap (~5 µs) and catches truncated files and other formats; scan data corrupted in place
is left to the trainer's decode, which skips and counts such a sample (`--full-decode` decodes here).
Any other format Pillow decodes (GIF, BMP, TIFF, …) is written as a lossless PNG.

Resizing follows img2dataset's resizer (img2dataset/resizer.py) so that its users get what they
know: `keep_ratio` (the short side becomes N), `center_crop` (short side N, then the centre N×N),
`border` (the long side N, padded to N×N with white), `keep_ratio_largest` (the long side N);
`resize_only_if_bigger` leaves smaller images alone; transparency is matted onto white; resized
images are JPEGs at quality 95 (its `encode_quality` default). Downscaling averages each output
pixel's area (Pillow's BOX filter, img2dataset's cv2 INTER_AREA), upscaling is Lanczos (its default).
EXIF orientation is not applied, as neither img2dataset (cv2.IMREAD_UNCHANGED) nor the loaders do.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Protocol

from PIL import Image

from data_prep.shards import Reject

# Rejection kinds, counted in the closing line and the manifest.
MISSING = "missing file"
UNREADABLE_FILE = "unreadable file"
NOT_AN_IMAGE = "not an image"
BAD_IMAGE = "unreadable image"

RESIZE_MODES = ("keep_ratio", "center_crop", "border", "keep_ratio_largest")
_NAMES = {"jpg": "JPEG", "png": "PNG", "webp": "WebP"}
WHITE = (255, 255, 255)


# --------------------------------------------------------------------------- where the bytes are


class ImageSource(Protocol):
    """Where one image's bytes are (a file, a zip member, a Parquet row): small and picklable, read in
    the worker that writes its shard."""

    def read(self) -> bytes:
        """The bytes; `Reject` when they cannot be had."""
        ...


@dataclass(frozen=True)
class ImageRef:
    """Where one image's bytes are: a zip member or a file. Small, so it travels to workers cheaply."""

    container: str  # the zip path, or "" for a plain file
    member: str  # member name inside the zip, or the file path

    def read(self) -> bytes:
        """The bytes; `Reject` when the file or member is missing or cannot be read."""
        try:
            if not self.container:
                with open(self.member, "rb") as f:
                    return f.read()
            return _zip(self.container).read(self.member)
        except (FileNotFoundError, KeyError):
            raise Reject(MISSING, f"no such file {self.where}") from None
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise Reject(UNREADABLE_FILE, f"cannot read {self.where} ({err})") from None

    @property
    def where(self) -> str:
        return f"{self.container}:{self.member}" if self.container else self.member


_OPEN_ZIPS: dict[tuple[int, str], zipfile.ZipFile] = {}


def _zip(path: str) -> zipfile.ZipFile:
    """One open handle per zip per process: keyed by pid, because a forked worker must never share
    its parent's file offset (zipfile seeks, then reads)."""
    key = (os.getpid(), path)
    if key not in _OPEN_ZIPS:
        _OPEN_ZIPS[key] = zipfile.ZipFile(path)
    return _OPEN_ZIPS[key]


def ignored_member(member: PurePosixPath) -> bool:
    """macOS zips carry __MACOSX/ and ._name AppleDouble files beside the real ones."""
    return "__MACOSX" in member.parts or member.name.startswith("._")


def unsafe_member(name: str) -> bool:
    """An archive member name that points outside the archive's root (zip-slip): never used as a path."""
    path = PurePosixPath(name.replace("\\", "/"))
    return path.is_absolute() or ".." in path.parts or ":" in name


# --------------------------------------------------------------------------- is it a whole image


def sniff(data: bytes) -> str:
    """The extension of a format kept as is ("jpg", "png", "webp"), from its magic bytes; else ""."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return ""


# Markers without a length field (TEM, RST0-7, SOI) and the frame headers that give the image size.
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}
_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_problem(data: bytes) -> str | None:
    """Why `data` is not a complete JPEG, or None: walks the markers (ITU T.81 §B.1) up to the first
    scan and looks for the end-of-image marker after it."""
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


def png_problem(data: bytes) -> str | None:
    """Why `data` is not a complete PNG, or None: the IHDR chunk first (PNG spec §5.6), with a size,
    and the IEND chunk at the end (some writers append a few bytes after it)."""
    if len(data) < 8 + 25 + 12 or data[12:16] != b"IHDR":
        return "truncated in the header"
    if not (int.from_bytes(data[16:20], "big") and int.from_bytes(data[20:24], "big")):
        return "header with zero size"
    if data.rfind(b"IEND", max(33, len(data) - 4096)) < 0:
        return "truncated (no IEND chunk)"
    return None


def webp_problem(data: bytes) -> str | None:
    """Why `data` is not a complete WebP, or None: the RIFF length covers the file and the first chunk
    is an image (VP8, VP8L or VP8X; Google's WebP container spec)."""
    if len(data) < 20:
        return "truncated in the header"
    if int.from_bytes(data[4:8], "little") + 8 > len(data):
        return "truncated (shorter than its RIFF length)"
    if data[12:16] not in (b"VP8 ", b"VP8L", b"VP8X"):
        return "no image chunk"
    return None


_PROBLEMS = {"jpg": jpeg_problem, "png": png_problem, "webp": webp_problem}


# --------------------------------------------------------------------------- the size it is written at


@dataclass(frozen=True)
class Resize:
    """img2dataset's `image_size`, `resize_mode`, `resize_only_if_bigger`, `encode_quality`; size 0 keeps
    the image as it is."""

    size: int = 0
    mode: str = "keep_ratio"
    only_if_bigger: bool = False
    quality: int = 95


KEEP = Resize()


def prepare_image(data: bytes, resize: Resize = KEEP, full_decode: bool = False) -> tuple[str, bytes]:
    """(extension, bytes) of the image as written: the original bytes of a whole JPEG/PNG/WebP, else
    re-encoded (resized, or another format as PNG). `Reject` for anything that is not a whole image."""
    ext = sniff(data)
    if ext:
        problem = _PROBLEMS[ext](data)
        if problem:
            raise Reject(BAD_IMAGE, f"{_NAMES[ext]} does not decode: {problem}")
        if not (resize.size or full_decode):
            return ext, data
    try:
        with Image.open(io.BytesIO(data)) as image:
            if resize.size:
                return _resized(image, ext, data, resize)
            if ext == "jpg":  # full_decode: 1/8-scale DCT decoding still walks every entropy-coded block
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
            if ext:
                return ext, data
            return "png", _encode(_matted(image), "png", 0)
    except Image.DecompressionBombError as err:
        raise Reject(BAD_IMAGE, f"too large to decode safely ({err})") from None
    except Image.UnidentifiedImageError:
        raise Reject(NOT_AN_IMAGE, f"not an image format Pillow knows (starts {data[:8]!r})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise Reject(BAD_IMAGE, f"does not decode ({err})") from None


def applies(width: int, height: int, resize: Resize) -> bool:
    """Whether img2dataset would resize this image: always, unless `only_if_bigger` and its short side
    (keep_ratio, center_crop) or long side (border, keep_ratio_largest) is at most N."""
    return not resize.only_if_bigger or _side(width, height, resize) > resize.size


def target_size(width: int, height: int, resize: Resize) -> tuple[int, int]:
    """The scaled (width, height) before any crop or pad: the short side (keep_ratio, center_crop) or
    the long side (border, keep_ratio_largest) becomes exactly N, the other keeps the ratio."""
    side, n = _side(width, height, resize), resize.size
    if width == side:
        return n, n if height == side else max(1, round(height * n / side))
    return max(1, round(width * n / side)), n


def _side(width: int, height: int, resize: Resize) -> int:
    return min(width, height) if resize.mode in ("keep_ratio", "center_crop") else max(width, height)


def _resized(image: Image.Image, ext: str, data: bytes, resize: Resize) -> tuple[str, bytes]:
    width, height = image.size
    if not applies(width, height, resize):
        if ext and not _has_alpha(image):
            image.load()  # it must still decode
            return ext, data  # as img2dataset: left alone, and not re-encoded
        return "jpg", _encode(_matted(image), "jpg", resize.quality)
    size, n = target_size(width, height, resize), resize.size
    if ext == "jpg" and size[0] * 2 <= width and size[1] * 2 <= height:
        # At half the source or less, decode at a reduced DCT scale (libjpeg's scaled IDCT through
        # Pillow's Image.draft: 1/2, 1/4 or 1/8, never below the target): no full-size image is made
        # and averaged down, and the IDCT and colour conversion shrink with it (bench.prep measures it
        # against plain PIL). The scaled IDCT keeps each block's low frequencies (ITU T.81 §A.3.3: the
        # DC term is the block's mean), a low-pass like the BOX filter, within a few levels of 255 of it
        # (tests/test_own_data.py).
        image.draft(None, size)
    picture = _matted(image)
    if picture.size != size:
        downscale = size[0] < width
        picture = picture.resize(size, Image.Resampling.BOX if downscale else Image.Resampling.LANCZOS)
    w, h = size
    if resize.mode == "center_crop" and size != (n, n):
        left, top = (w - n) // 2, (h - n) // 2  # albumentations' center_crop: the odd pixel goes right/down
        picture = picture.crop((left, top, left + n, top + n))
    elif resize.mode == "border" and size != (n, n):
        canvas = Image.new(picture.mode, (n, n), WHITE if picture.mode == "RGB" else 255)
        canvas.paste(picture, ((n - w) // 2, (n - h) // 2))  # albumentations' pad: centred, odd pixel below
        picture = canvas
    return "jpg", _encode(picture, "jpg", resize.quality)


def _has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def _matted(image: Image.Image) -> Image.Image:
    """RGB (or greyscale L kept as L); transparency matted onto white, as img2dataset does."""
    if image.mode in ("RGB", "L"):
        image.load()
        return image
    if _has_alpha(image):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, WHITE)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def _encode(image: Image.Image, ext: str, quality: int) -> bytes:
    """Fixed encoder settings, so that the bytes depend only on the pixels (and Pillow's build)."""
    out = io.BytesIO()
    if ext == "jpg":
        image.save(out, format="JPEG", quality=quality)
    else:
        image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()
