"""A real HTTP server for shards, on 127.0.0.1, with the faults a long download meets: Python's
http.server in a thread, serving a folder, answering Range requests (RFC 9110 §14: `bytes=N-`, 206
with Content-Range) and HEAD, and, once each when asked, dropping the connection half-way through a
file, answering 503, or ignoring Range (200 and the whole body, as some servers do)."""

from __future__ import annotations

import base64
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class ShardServer:
    """`with ShardServer(folder) as server:` → `server.url` is http://127.0.0.1:PORT (`port`: a free
    one unless given); set `drop`,
    `unavailable` (file names, each fault used once), `ignore_range`, `auth` ("user:password"); every
    request lands in `server.requests` as (method, path, Range header)."""

    def __init__(self, folder: Path, port: int = 0) -> None:
        self.folder = folder
        self.drop: set[str] = set()
        self.unavailable: set[str] = set()
        self.ignore_range = False
        self.auth = ""
        self.requests: list[tuple[str, str, str]] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ShardServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet: the tests read `requests`
                pass

            def do_HEAD(self) -> None:
                self.answer(body=False)

            def do_GET(self) -> None:
                self.answer(body=True)

            def answer(self, body: bool) -> None:
                name = self.path.lstrip("/").split("?")[0]
                server.requests.append((self.command, name, self.headers.get("Range", "")))
                if (
                    server.auth
                    and self.headers.get("Authorization")
                    != "Basic " + base64.b64encode(server.auth.encode()).decode()
                ):
                    return self.status(401, {"WWW-Authenticate": 'Basic realm="shards"'})
                path = server.folder / name
                if "/" in name or not path.is_file():
                    return self.status(404)
                if body and name in server.unavailable:
                    server.unavailable.discard(name)
                    return self.status(503)
                data = path.read_bytes()
                start = 0
                wanted = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
                if wanted and not server.ignore_range:
                    start = int(wanted.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if not body:
                    return
                if name in server.drop:  # half the body, then the connection goes away
                    server.drop.discard(name)
                    self.wfile.write(data[start : start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(data[start:])

            def status(self, code: int, headers: dict[str, str] | None = None) -> None:
                self.send_response(code)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

        return Handler
