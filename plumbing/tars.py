"""Reproducible tar members, written by hand (data_prep's shards, the sampler's optional shards).

POSIX.1-1988 ustar headers with a fixed mtime, owner and mode, so the bytes depend only on the
content; PAX headers when a name needs them. `tarfile.addfile` spends ~10 µs a member on the header
and 16 KiB copies; the bytes here equal tarfile's (tests/test_data_prep.py checks it).
"""

from __future__ import annotations

import tarfile

# Fixed metadata: 2020-01-01T00:00:00Z, root-owned, rw-r--r-- (mtime 0 makes GNU tar warn).
MTIME = 1577836800
MODE = 0o644


def _ustar_template() -> tuple[bytes, int]:
    """A ustar header with everything but name, size and checksum filled in, and its byte sum."""
    header = bytearray(512)
    header[100:124] = b"%07o\x00%07o\x00%07o\x00" % (MODE, 0, 0)  # mode, uid, gid
    header[136:148] = b"%011o\x00" % MTIME
    header[148:156] = b"        "  # the checksum is summed with its own field as spaces
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    return bytes(header), sum(header)


_USTAR, _USTAR_SUM = _ustar_template()


def tar_member(name: str, data: bytes) -> tuple[bytes, bytes, bytes]:
    """One regular-file member: its header, the data, and the zero padding to a 512-byte block."""
    encoded = name.encode("utf-8")
    if len(encoded) <= 100 and encoded.isascii():
        size = b"%011o\x00" % len(data)
        header = bytearray(_USTAR)
        header[0 : len(encoded)] = encoded
        header[124:136] = size
        header[148:156] = b"%06o\x00 " % (_USTAR_SUM + sum(encoded) + sum(size))
    else:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), MTIME, MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        header = bytearray(info.tobuf(tarfile.PAX_FORMAT))
    return bytes(header), data, _ZEROS[: -len(data) % 512]


_ZEROS = bytes(512)


def end_of_archive(size: int) -> bytes:
    """Two zero blocks, then zeros up to a whole 10 KiB record, as tarfile closes an archive."""
    size += 1024
    return bytes(1024 + (-size % tarfile.RECORDSIZE))


def write_tar(path_tmp: str, members: list[tuple[str, bytes]]) -> None:
    """A whole tar of (name, bytes) members in the given order."""
    with open(path_tmp, "wb") as f:
        size = 0
        for name, data in members:
            for part in tar_member(name, data):
                f.write(part)
                size += len(part)
        f.write(end_of_archive(size))
