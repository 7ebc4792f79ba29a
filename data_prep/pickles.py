"""CIFAR-10 batch pickles: a reader that admits only what a real batch holds, and a writer of that form.

The official batches were written by Python 2's cPickle, protocol 2. Read with `pickletools`, the
official `test_batch` holds exactly three globals — numpy.core.multiarray._reconstruct, numpy.ndarray,
numpy.dtype — and the pixels as one Python-2 string (BINSTRING); `batches.meta` holds none. Unpickling
runs whatever a pickle names, so the reader resolves those three names itself and refuses any other
(see ../shared/notes/formats.md). Python 3's own `pickle.dump(protocol=2)` writes bytes through
`_codecs.encode`, which the real files never use, so the synthetic set writes its pickles opcode by
opcode here to stay in the official form.
"""

from __future__ import annotations

import io
import pickle
import struct
from typing import Any

import numpy as np

# numpy 2 moved numpy.core to numpy._core; the official files name the old module.
_reconstruct = np.ndarray((0,)).__reduce__()[0]
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names a global that no CIFAR-10 batch needs."""


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"refusing global {module}.{name}: a CIFAR-10 batch only needs numpy arrays"
            ) from None


def safe_load(data: bytes) -> Any:
    """Unpickle CIFAR-10 batch bytes (`encoding="bytes"`: keys come back as bytes)."""
    return _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()


class Py2PickleWriter:
    """Protocol-2 pickles shaped like Python 2 cPickle's: str as BINSTRING, arrays via _reconstruct."""

    def __init__(self) -> None:
        self.out = io.BytesIO()

    def dump(self, obj: Any) -> bytes:
        self.out.write(b"\x80\x02")  # PROTO 2
        self._obj(obj)
        self.out.write(b".")  # STOP
        return self.out.getvalue()

    def _obj(self, obj: Any) -> None:
        if obj is None:
            self.out.write(b"N")
        elif obj is False or obj is True:
            self.out.write(b"\x89" if obj is False else b"\x88")
        elif isinstance(obj, int):
            self._int(obj)
        elif isinstance(obj, (bytes, str)):
            self._py2str(obj.encode("latin-1") if isinstance(obj, str) else obj)
        elif isinstance(obj, tuple):
            self._tuple(obj)
        elif isinstance(obj, list):
            self.out.write(b"]")  # EMPTY_LIST
            for start in range(0, len(obj), 1000):  # cPickle appends in chunks of 1000
                self.out.write(b"(")
                for item in obj[start : start + 1000]:
                    self._obj(item)
                self.out.write(b"e")  # APPENDS
        elif isinstance(obj, dict):
            self.out.write(b"}(")
            for key, value in obj.items():
                self._obj(key)
                self._obj(value)
            self.out.write(b"u")  # SETITEMS
        elif isinstance(obj, np.ndarray):
            self._ndarray(obj)
        else:
            raise TypeError(f"cannot write {type(obj).__name__} in a CIFAR-style pickle")

    def _int(self, value: int) -> None:
        if 0 <= value < 256:
            self.out.write(b"K" + bytes([value]))  # BININT1
        elif -(2**31) <= value < 2**31:
            self.out.write(b"J" + struct.pack("<i", value))  # BININT
        else:
            raise ValueError(f"integer {value} out of range for this writer")

    def _py2str(self, data: bytes) -> None:
        if len(data) < 256:
            self.out.write(b"U" + bytes([len(data)]) + data)  # SHORT_BINSTRING
        else:
            self.out.write(b"T" + struct.pack("<I", len(data)) + data)  # BINSTRING

    def _tuple(self, items: tuple[Any, ...]) -> None:
        if not items:
            self.out.write(b")")
            return
        if len(items) > 3:
            self.out.write(b"(")
        for item in items:
            self._obj(item)
        self.out.write({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t"))

    def _global(self, module: str, name: str) -> None:
        self.out.write(b"c" + module.encode() + b"\n" + name.encode() + b"\n")

    def _ndarray(self, array: np.ndarray) -> None:
        if array.dtype != np.uint8:
            raise TypeError("only uint8 arrays occur in CIFAR-10 batches")
        self._global("numpy.core.multiarray", "_reconstruct")
        self._global("numpy", "ndarray")
        self._tuple((0,))
        self._py2str(b"b")
        self.out.write(b"\x87R")  # TUPLE3, REDUCE → empty ndarray
        self.out.write(b"(")
        self._int(1)
        self._tuple(tuple(int(n) for n in array.shape))
        self._global("numpy", "dtype")
        self._tuple((b"u1", 0, 1))
        self.out.write(b"R")
        self._tuple((3, b"|", None, None, None, -1, -1, 0))
        self.out.write(b"b")  # BUILD dtype
        self.out.write(b"\x89")  # not Fortran order
        self._py2str(np.ascontiguousarray(array).tobytes())
        self.out.write(b"tb")  # TUPLE (the state), BUILD the array


def py2_pickle(obj: Any) -> bytes:
    return Py2PickleWriter().dump(obj)
