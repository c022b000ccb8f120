"""Loopback HTTP helpers that misbehave on purpose: a proxy that fails, corrupts or redirects, and a blob store.

`FlakyProxy` sits in front of a real registry: it answers `fail_status` to the first
`fail_first` requests that `fail_when(method, path)` selects, cuts off or corrupts selected
response bodies, or redirects selected paths elsewhere; everything else is forwarded. It
records every request (method, path, status, Authorization header) so tests can count retries.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

COPY_CHUNK_BYTES = 64 * 1024
UPSTREAM_TIMEOUT_S = 30.0
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

PathRule = Callable[[str, str], bool]  # (method, path) -> applies


def always(_method: str, _path: str) -> bool:
    return True


def blobs(_method: str, path: str) -> bool:
    return "/blobs/" in path


def manifests(_method: str, path: str) -> bool:
    return "/manifests/" in path


@dataclass(frozen=True)
class Seen:
    """One request the proxy got and what it answered."""

    method: str
    path: str
    status: int
    authorization: str | None


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class FlakyProxy:
    """A misbehaving forwarder to `upstream` ("host:port"); see the module docstring."""

    def __init__(
        self,
        upstream: str,
        *,
        fail_first: int = 0,
        fail_status: int = 500,
        fail_when: PathRule = always,
        fail_headers: Mapping[str, str] | None = None,
        cut_first: int = 0,
        cut_when: PathRule = blobs,
        corrupt_when: PathRule | None = None,
        redirect: Callable[[str], str | None] | None = None,
    ) -> None:
        self.upstream = upstream
        self.fail_left = fail_first
        self.fail_status = fail_status
        self.fail_when = fail_when
        self.fail_headers = dict(fail_headers or {})
        self.cut_left = cut_first
        self.cut_when = cut_when
        self.corrupt_when = corrupt_when
        self.redirect = redirect
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server = _Server(self._handler())

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def url(self) -> str:
        return self._server.url

    def count(self, rule: PathRule = always) -> int:
        """How many requests the proxy got that `rule` selects."""
        return sum(1 for s in self.seen if rule(s.method, s.path))

    def _take(self, attr: str) -> bool:
        with self._lock:
            left: int = getattr(self, attr)
            if left > 0:
                setattr(self, attr, left - 1)
                return True
            return False

    def __enter__(self) -> FlakyProxy:
        self._server.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.stop()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self, status: int) -> None:
                proxy.seen.append(Seen(self.command, self.path, status, self.headers.get("Authorization")))

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                method, path = self.command, self.path
                if proxy.fail_when(method, path) and proxy._take("fail_left"):
                    self._record(proxy.fail_status)
                    data = json.dumps({"errors": [{"code": "UNAVAILABLE", "message": "injected failure"}]}).encode()
                    self.send_response(proxy.fail_status)
                    for name, value in proxy.fail_headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                target = proxy.redirect(path) if proxy.redirect is not None else None
                if target is not None:
                    self._record(307)
                    self.send_response(307)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._forward(method, path, body)

            def _forward(self, method: str, path: str, body: bytes | None) -> None:
                conn = http.client.HTTPConnection(proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Host"] = proxy.upstream
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                self._record(resp.status)
                cut = resp.status == 200 and proxy.cut_when(method, path) and proxy._take("cut_left")
                corrupt = resp.status == 200 and proxy.corrupt_when is not None and proxy.corrupt_when(method, path)
                data = resp.read() if resp.getheader("Content-Length") is None else None
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                total = len(data) if data is not None else int(resp.getheader("Content-Length") or 0)
                self.send_header("Content-Length", str(total))
                self.end_headers()
                body_chunks = iter([data]) if data is not None else iter(lambda: resp.read(COPY_CHUNK_BYTES), b"")
                sent = 0
                for chunk in body_chunks:
                    if not chunk:
                        break
                    if corrupt and sent == 0:
                        chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]  # noqa: PLW2901 - the point of the proxy
                    if cut and sent + len(chunk) > total // 2:
                        self.wfile.write(chunk[: total // 2 - sent])
                        self.wfile.flush()
                        self.close_connection = True
                        break
                    self.wfile.write(chunk)
                    sent += len(chunk)
                conn.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


class BlobStore:
    """A plain loopback file server standing in for a registry's storage backend (redirect target).

    Serves `blobs[path]` and records each request's Authorization header in `authorization`.
    """

    def __init__(self, blobs: Mapping[str, bytes]) -> None:
        self.blobs = dict(blobs)
        self.authorization: list[str | None] = []
        store = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                store.authorization.append(self.headers.get("Authorization"))
                data = store.blobs.get(self.path)
                self.send_response(200 if data is not None else 404)
                self.send_header("Content-Length", str(len(data or b"")))
                self.end_headers()
                self.wfile.write(data or b"")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = _Server(Handler)

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def url(self) -> str:
        return self._server.url

    def __enter__(self) -> BlobStore:
        self._server.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.stop()
