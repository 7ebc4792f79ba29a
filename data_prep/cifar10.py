"""Read the official CIFAR-10 python release (`cifar-10-python.tar.gz` or `cifar-10-batches-py/`).

Format (../shared/notes/formats.md): five `data_batch_N` and one `test_batch`, protocol-2 pickles with
bytes keys b"data" (uint8 N×3072, rows of 1024 red, 1024 green, 1024 blue bytes, each 32×32 row-major),
b"labels", b"filenames", b"batch_label"; `batches.meta` holds b"label_names".
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from data_prep.images import KEEP, Resize, prepare_image
from data_prep.pickles import UnsafePickleError, safe_load
from data_prep.shards import SourceInfo, describe_source
from plumbing.errors import UserError
from plumbing.seeds import derive_seed

ARCHIVE = "cifar-10-python.tar.gz"
FOLDER = "cifar-10-batches-py"
# The official checksums, as torchvision's CIFAR10 lists them.
OFFICIAL_MD5 = {
    ARCHIVE: "c58f30108f718f92721af3b95e74349a",
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
MEMBERS = ["batches.meta", *SPLITS["train"], *SPLITS["test"]]
PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class CifarRow:
    """One image of a batch, built into WebDataset members inside a shard-writing worker."""

    key: str
    pixels: bytes
    label: int
    meta: str  # the json member, already serialised
    prompt: str
    resize: Resize = KEEP

    def members(self) -> dict[str, bytes]:
        hwc = np.frombuffer(self.pixels, dtype=np.uint8).reshape(3, 32, 32).transpose(1, 2, 0)
        png = io.BytesIO()
        Image.fromarray(hwc, "RGB").save(png, format="PNG", optimize=False, compress_level=6)
        ext, image = (
            prepare_image(png.getvalue(), self.resize) if self.resize.size else ("png", png.getvalue())
        )
        return {
            ext: image,
            "cls": str(self.label).encode(),
            "txt": self.prompt.encode(),
            "json": self.meta.encode(),
        }


@dataclass(frozen=True)
class CifarSource:
    label_names: list[str]
    splits: dict[str, list[CifarRow]]
    info: SourceInfo


def read_cifar10(
    source: Path, verify: bool, templates: list[str], seed: int, resize: Resize = KEEP
) -> CifarSource:
    """Every row of every batch as a `CifarRow`, after checking checksums (unless `verify` is off)."""
    raw, info = _read_members(source, verify)
    meta = _load(raw["batches.meta"], _where(source, "batches.meta"))
    try:
        label_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[b"label_names"]]
    except (KeyError, TypeError):
        raise UserError(f"{_where(source, 'batches.meta')}: expected a dict with b'label_names'") from None
    splits: dict[str, list[CifarRow]] = {}
    for split, names in SPLITS.items():
        rows: list[CifarRow] = []
        for name in names:
            rows += _rows(
                name,
                _load(raw[name], _where(source, name)),
                label_names,
                templates,
                seed,
                _where(source, name),
                resize,
            )
        splits[split] = rows
    return CifarSource(label_names, splits, info)


def _where(source: Path, member: str) -> str:
    return f"{source}:{member}" if source.is_file() else str(_folder(source) / member)


def _folder(source: Path) -> Path:
    return source / FOLDER if (source / FOLDER).is_dir() else source


def _read_members(source: Path, verify: bool) -> tuple[dict[str, bytes], SourceInfo]:
    if not source.exists():
        raise UserError(f"{source}: no such file or folder (expected {ARCHIVE} or a {FOLDER}/ folder)")
    if source.is_file():
        info = describe_source(source, digests=("md5", "sha256"))
        if verify and info.md5 != OFFICIAL_MD5[ARCHIVE]:
            raise UserError(
                f"{source}: MD5 {info.md5} is not the official {OFFICIAL_MD5[ARCHIVE]} (truncated download or "
                "not the official archive); pass --no-verify to use it anyway"
            )
        raw = _members_from_tar(source)
    else:
        folder = _folder(source)
        raw = {}
        for name in MEMBERS:
            try:
                raw[name] = (folder / name).read_bytes()
            except FileNotFoundError:
                raise UserError(
                    f"{folder / name}: missing (expected the official CIFAR-10 python batches)"
                ) from None
        info = describe_source(folder, digests=())
    if verify:
        for name in MEMBERS:
            md5 = hashlib.md5(raw[name]).hexdigest()
            if md5 != OFFICIAL_MD5[name]:
                raise UserError(
                    f"{_where(source, name)}: MD5 {md5} is not the official {OFFICIAL_MD5[name]}; "
                    "pass --no-verify to use it anyway"
                )
    return raw, info


def _members_from_tar(path: Path) -> dict[str, bytes]:
    found: dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if name in MEMBERS and member.isfile() and name not in found:
                    handle = tar.extractfile(member)
                    assert handle is not None
                    found[name] = handle.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{path}: cannot read the archive ({err}); re-download {ARCHIVE}") from None
    missing = [n for n in MEMBERS if n not in found]
    if missing:
        raise UserError(
            f"{path}: archive lacks {', '.join(missing)} (expected {FOLDER}/ with the official batches)"
        )
    return found


def _load(data: bytes, where: str) -> dict:
    name = where.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    try:
        obj = safe_load(data)
    except UnsafePickleError as err:
        raise UserError(f"{where}: {err}") from None
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        struct.error,
    ) as err:
        expected = OFFICIAL_MD5.get(name, "?")
        raise UserError(
            f"{where}: not a readable CIFAR-10 batch ({err}); the official file has MD5 {expected}"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a dict, got {type(obj).__name__}")
    return obj


def _rows(
    name: str,
    batch: dict,
    label_names: list[str],
    templates: list[str],
    seed: int,
    where: str,
    resize: Resize,
) -> list[CifarRow]:
    try:
        data, labels, filenames = batch[b"data"], batch[b"labels"], batch[b"filenames"]
    except KeyError as err:
        raise UserError(
            f"{where}: missing key {err.args[0]!r} (expected b'data', b'labels', b'filenames')"
        ) from None
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == PIXELS
    ):
        raise UserError(f"{where}: b'data' must be a uint8 array of shape (N, {PIXELS})")
    if len(labels) != len(data) or len(filenames) != len(data):
        raise UserError(f"{where}: {len(data)} rows but {len(labels)} labels and {len(filenames)} filenames")
    rows = []
    for row, (label, filename) in enumerate(zip(labels, filenames)):
        if not (isinstance(label, int) and 0 <= label < len(label_names)):
            raise UserError(f"{where}: row {row}: label {label!r} is not in 0..{len(label_names) - 1}")
        key = f"{name}-{row:05d}"
        prompts = [t.format(label=label_names[label]) for t in templates]
        meta = {
            "label": label,
            "label_name": label_names[label],
            "batch": name,
            "row": row,
            "filename": filename.decode("latin-1") if isinstance(filename, bytes) else str(filename),
            "prompts": prompts,
        }
        prompt = prompts[derive_seed(seed, key) % len(prompts)]
        rows.append(
            CifarRow(key, data[row].tobytes(), label, json.dumps(meta, sort_keys=True), prompt, resize)
        )
    return rows
