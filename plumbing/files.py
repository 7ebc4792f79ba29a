"""Files that are either complete or absent: atomic writes, checksums, and paths kept inside a root."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from plumbing.errors import LocalError, UserError

_CHUNK = 1 << 20


def tmp_name(path: Path) -> Path:
    """A hidden sibling of `path`, unique to this process, that readers of the folder ignore."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_tmp_name(name: str) -> bool:
    return name.startswith(".") and ".tmp-" in name


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, durable: bool = True) -> None:
    """Rename `tmp` to `final`: a reader sees the old file or the whole new one, even if this process
    is killed. `durable` also flushes it to disk first, so that it survives a machine crash (on ext4
    that fsync also writes out every dirty page the process wrote before: costly after big writes)."""
    if durable:
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)


def is_write_error(err: Exception) -> bool:
    """An OSError, or the RuntimeError that torch.save and safetensors raise when a write fails."""
    text = str(err).lower()
    return isinstance(err, OSError) or ("write" in text or "no space" in text or "file too large" in text)


def write_failed(path: Path, err: Exception, then: str = "") -> LocalError:
    """A failed write (an OSError, or the RuntimeError torch.save and safetensors raise) as one line
    that names the file, says so when the disk is full, and what to do `then`. Local: the rank whose
    disk filled prints it."""
    full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
    full = full or any(s in str(err) for s in ("No space left", "File too large", "file write failed"))
    reason = getattr(err, "strerror", None) or " ".join(str(err).split())[:200]
    return LocalError(
        f"cannot write {path}: {reason}{' (disk full?)' if full else ''}" + (f"; {then}" if then else "")
    )


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    """Write `path` whole or not at all; a failed write (full disk, no permission) is a `LocalError`
    naming `path`, and the old file, if any, is left as it was."""
    tmp = tmp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
        publish(tmp, path, durable)
    except OSError as err:
        raise write_failed(path, err) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), durable)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n", durable)


def read_json(path: Path) -> Any:
    """Read a JSON file; a missing or malformed file is a `UserError` that names it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def file_digests(path: Path, *algorithms: str) -> dict[str, str]:
    """Hex digests of a file for each algorithm (e.g. "md5", "sha256"), reading it once."""
    hashes = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashes.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashes.items()}


def sha256_file(path: Path) -> str:
    return file_digests(path, "sha256")["sha256"]


def tree_digest(root: Path, pattern: str = "**/*") -> str:
    """sha256 over the relative names and contents of the files under `root`, in sorted order."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.glob(pattern) if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(path).encode())
    return h.hexdigest()


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str, max_len: int = 80) -> str:
    """A file name made from user text: only [A-Za-z0-9._-], no leading dot, never empty."""
    name = _UNSAFE.sub("-", text).strip("-.")[:max_len].strip("-.")
    return name or "item"


def inside(root: Path, *parts: str) -> Path:
    """`root/parts…`, refusing any result that resolves outside `root` (../, absolute parts, links)."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise UserError(f"path {'/'.join(parts)!r} escapes {root}")
    return path
