"""Shards that live elsewhere, opened as one byte stream that outlives a dropped connection.

A shard's location is what the manifest records, as the user gave it (core.secrets keeps credentials
out of it):

* a local path (or `file://…`): opened as a file;
* `http://…`, `https://…`: read with urllib; after a dropped connection, a timeout or a 5xx the read
  goes on from the byte reached with an HTTP Range request (RFC 9110 §14.2); a server that ignores
  Range answers 200 with the whole body, and what was read already is skipped;
* `pipe:COMMAND`: webdataset's convention (webdataset/gopen.py `gopen_pipe`): the command runs in a
  shell and its standard output is the shard (`pipe:aws s3 cp s3://bucket/00000.tar -`, open_clip's
  way in); exit status 141 (SIGPIPE, our own early close) is no error, as there. A command that fails
  mid-way is run again and the bytes already read are skipped;
* any other `scheme://` through fsspec (`s3://` with s3fs, `gs://` with gcsfs: the extras `s3` and
  `gcs`); a retry reopens the file and seeks to the byte reached.

The consumer (webdataset's tar reader, with the sha256 of core.shards.HashingReader on top) never sees
a retry: every byte is handed over exactly once, in order, so samples are neither repeated nor lost
and the running sha256 still covers the shard once. Each retry is logged as a warning that counts it.
"""

from __future__ import annotations

import base64
import http.client
import logging
import netrc
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from core.secrets import expand, redact
from plumbing.errors import LocalError, UserError

log = logging.getLogger("core.remote")

RETRIES = 5
"""Retries in a row without progress before a shard read fails (a read that moves on resets the count)."""
TIMEOUT = 60.0
"""Seconds a connection may stay silent before it counts as dropped."""
DELAY = 1.0
"""Seconds before the first retry; each next one waits twice as long (at most 30)."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CHUNK = 1 << 20
# What a retry can cure: the network, the server's temporary trouble (RFC 9110 §15.6: 5xx; 429).
_TRANSIENT = (ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException, urllib.error.URLError)
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


def scheme(location: str) -> str:
    """ "pipe", "http", "https", an fsspec protocol ("s3", "gs", …), or "" for a local path."""
    if location.startswith("pipe:"):
        return "pipe"
    match = _SCHEME.match(location)
    return "" if not match or match.group(1).lower() == "file" else match.group(1).lower()


def is_remote(location: str) -> bool:
    return bool(scheme(location))


def local_path(location: str) -> str:
    """A local location as a path (`file://` dropped, as webdataset's gopen_file does)."""
    return re.sub(r"^file://", "", location)


def open_shard(location: str) -> Any:
    """A binary stream of the shard at `location` (read, close, context manager)."""
    kind = scheme(location)
    if not kind:
        return open(local_path(location), "rb")
    if kind == "pipe":
        return Resuming(_PipeSource(location), location, RETRIES, DELAY)
    if kind in ("http", "https"):
        return Resuming(_HttpSource(location), location, RETRIES, DELAY)
    return Resuming(_FsspecSource(location), location, RETRIES, DELAY)


def remote_size(location: str) -> int | None:
    """The size of a remote shard without reading it (HTTP HEAD, fsspec's info), else None (`pipe:`).
    A shard that is not there is a one-line error naming it."""
    kind = scheme(location)
    if kind == "pipe" or not kind:
        return None
    if kind in ("http", "https"):
        request = _request(location, method="HEAD")
        for attempt in range(RETRIES + 1):
            try:
                with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                    length = response.headers.get("Content-Length")
                    return int(length) if length is not None else None
            except urllib.error.HTTPError as err:
                if err.code not in _RETRY_STATUS or attempt == RETRIES:
                    raise UserError(_http_problem(location, err)) from None
            except _TRANSIENT as err:
                if attempt == RETRIES:
                    raise UserError(f"shard {redact(location)}: unreachable ({_why(err)})") from None
            time.sleep(min(DELAY * 2**attempt, 30.0))
    fs, path = fsspec_of(location)
    try:
        return int(fs.size(path))
    except FileNotFoundError:
        raise UserError(f"shard {redact(location)} is named in the manifest but missing") from None


class Resuming:
    """A source's bytes as one stream: a failed read reopens the source at the byte reached."""

    def __init__(self, source: Any, location: str, retries: int, delay: float) -> None:
        self.source, self.location, self.retries, self.delay = source, location, retries, delay
        self.offset, self.failures = 0, 0
        self._open()

    def _open(self) -> None:
        while True:
            try:
                self.source.open(self.offset)
                return
            except _Retry as err:
                self._wait(err.why)

    def _wait(self, why: str) -> None:
        """Count a failure; give up after `retries` in a row, else wait (1, 2, 4 … 30 s) and go on."""
        self.failures += 1
        self.source.close()
        where = redact(self.location)
        if self.failures > self.retries:
            raise LocalError(
                f"shard {where}: {why} at byte {self.offset}; gave up after {self.retries} retries"
            )
        pause = min(self.delay * 2 ** (self.failures - 1), 30.0)
        log.warning(
            "shard %s: %s at byte %d; retry %d of %d in %.0f s (from that byte on)",
            where,
            why,
            self.offset,
            self.failures,
            self.retries,
            pause,
        )
        time.sleep(pause)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(_CHUNK), b""))
        while True:
            try:
                data = self.source.read(size)
            except _Retry as err:
                self._wait(err.why)
                self._open()
                continue
            self.offset += len(data)
            if data:
                self.failures = 0  # progress: the next failure starts the count again
            return data

    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> Resuming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Retry(Exception):
    """A failure a retry can cure (`why` says what happened, for the log)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def _why(err: BaseException) -> str:
    text = " ".join(str(getattr(err, "reason", None) or err or type(err).__name__).split())
    return redact(f"{type(err).__name__}: {text}" if text != type(err).__name__ else text)[:160]


# --------------------------------------------------------------------------- http(s)


def _request(location: str, method: str = "GET", offset: int = 0) -> urllib.request.Request:
    """A request for the expanded URL: user:password@ moved into a Basic Authorization header (urllib
    does not take them from the URL), else ~/.netrc's entry for the host (as curl -n, wget and requests
    read it). Unredirected: a redirect to another host (a signed S3 URL) does not carry it along."""
    parts = urllib.parse.urlsplit(expand(location))
    user, password = parts.username, parts.password
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    url = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    request = urllib.request.Request(url, method=method)
    if user is None:
        user, password = _netrc(parts.hostname or "")
    if user is not None:
        token = base64.b64encode(
            f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}".encode()
        )
        request.add_unredirected_header("Authorization", f"Basic {token.decode()}")
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    return request


def _netrc(host: str) -> tuple[str | None, str | None]:
    try:
        entry = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return None, None
    return (entry[0], entry[2]) if entry else (None, None)


def _http_problem(location: str, err: urllib.error.HTTPError) -> str:
    hint = ""
    if err.code in (401, 403):
        hint = (
            ": credentials go in ~/.netrc (machine HOST login USER password …) or in the URL as "
            "${VARIABLE}s read from the environment"
        )
    return f"shard {redact(location)}: HTTP {err.code} {err.reason}{hint}"


class _HttpSource:
    def __init__(self, location: str) -> None:
        self.location = location
        self.response: Any = None
        self.left: int | None = None  # bytes the current response still owes (None: unknown)

    def open(self, offset: int) -> None:
        try:
            response = urllib.request.urlopen(_request(self.location, offset=offset), timeout=TIMEOUT)
        except urllib.error.HTTPError as err:
            if err.code in _RETRY_STATUS:
                raise _Retry(f"HTTP {err.code} {err.reason}") from None
            if err.code == 416 and offset:
                raise _Retry("HTTP 416 (the shard got shorter?)") from None
            raise LocalError(_http_problem(self.location, err)) from None
        except _TRANSIENT as err:
            raise _Retry(_why(err)) from None
        self.response = response
        length = response.headers.get("Content-Length")
        self.left = int(length) if length is not None else None
        if offset and response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != offset:
                raise LocalError(
                    f"shard {redact(self.location)}: asked for byte {offset} on, the server sent "
                    f"{response.headers.get('Content-Range')!r}"
                )
        elif offset:  # 200: the server ignored Range and sends it all; skip what was read already
            self._skip(offset)

    def _skip(self, count: int) -> None:
        while count:
            data = self.read(min(count, _CHUNK))
            if not data:
                raise _Retry(f"the body ended before byte {count}")
            count -= len(data)

    def read(self, size: int) -> bytes:
        try:
            data = self.response.read(size)
        except _TRANSIENT as err:  # http.client.IncompleteRead is an HTTPException
            raise _Retry(_why(err)) from None
        if self.left is not None:
            if not data and self.left > 0 and size:
                # http.client returns b"" when the peer closes before Content-Length (Lib/http/client.py
                # HTTPResponse.read: "it might break compatibility" to raise): a dropped connection.
                raise _Retry(f"the connection closed {self.left} bytes short of the response's end")
            self.left -= len(data)
        return data

    def close(self) -> None:
        if self.response is not None:
            self.response.close()
            self.response = None


# --------------------------------------------------------------------------- pipe:


class _PipeSource:
    def __init__(self, location: str) -> None:
        self.command = location[len("pipe:") :]
        self.location = location
        self.proc: subprocess.Popen[bytes] | None = None

    def open(self, offset: int) -> None:
        # shell=True as webdataset's gopen_pipe: the command is the user's own, and its ${VARIABLE}s
        # (credentials) are expanded by the shell, never written anywhere by us.
        self.proc = subprocess.Popen(self.command, shell=True, stdout=subprocess.PIPE, bufsize=_CHUNK)
        while offset:
            data = self.read(min(offset, _CHUNK))
            if not data:
                raise _Retry(f"its output ended before byte {offset}")
            offset -= len(data)

    def read(self, size: int) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        data = self.proc.stdout.read(size)
        if not data and size:
            status = self.proc.wait()
            if status not in (0, 141):
                raise _Retry(f"the command exited {status}")
        return data

    def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()  # closed early (the reader has what it wanted)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        self.proc.wait()
        self.proc = None


# --------------------------------------------------------------------------- fsspec


def fsspec_of(location: str) -> tuple[Any, str]:
    """fsspec's file system and path for an URL; a missing backend is one line naming the extra."""
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise UserError(
            f"{redact(location)}: reading {scheme(location)}:// needs fsspec: pip install fsspec"
        ) from None
    extra = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}.get(scheme(location))
    try:
        fsspec.get_filesystem_class(scheme(location))
        return url_to_fs(expand(location))
    except ImportError as err:
        how = f"pip install 'clip-harness[{extra}]'" if extra else str(err)
        raise UserError(
            f"{redact(location)}: reading {scheme(location)}:// needs fsspec's backend: {how} ({err})"
        ) from None
    except ValueError as err:
        raise UserError(
            f"{redact(location)}: {err} (expected http(s)://, pipe:, s3://, gs:// or a path)"
        ) from None


class _FsspecSource:
    def __init__(self, location: str) -> None:
        self.location = location
        self.file: Any = None

    def open(self, offset: int) -> None:
        fs, path = fsspec_of(self.location)
        try:
            self.file = fs.open(path, "rb")
            if offset:
                self.file.seek(offset)
        except (FileNotFoundError, PermissionError) as err:
            raise LocalError(f"shard {redact(self.location)}: {_why(err)}") from None
        except OSError as err:
            raise _Retry(_why(err)) from None

    def read(self, size: int) -> bytes:
        try:
            return bytes(self.file.read(size))
        except (FileNotFoundError, PermissionError) as err:
            raise LocalError(f"shard {redact(self.location)}: {_why(err)}") from None
        except OSError as err:
            raise _Retry(_why(err)) from None

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
