"""Loopback HTTP helpers that misbehave on purpose: a fault-injecting registry proxy, and a blob store.

`FlakyProxy` sits in front of a real registry and forwards every request faithfully (a client's
`Range` goes upstream, a 206 and its Content-Range come back) except those its fault plan
selects. The plan is a list of `Fault`s: a kind with its parameters, a `when(method, path)`
predicate and a number of turns (`times`; None for every matching request). The first fault in
the plan that matches a request and has turns left decides what happens to it:

    forward    pass it through untouched (put first to spare the first N requests)
    storm      answer `status` (500, 502, 503, 429...), Retry-After optional; upstream never asked
    blackhole  read the request, never answer; hold the socket until the client leaves or the proxy stops
    reset      relay the headers and `after_bytes` of the body, then abort the connection with a TCP RST
    truncate   announce the full Content-Length, send `after_bytes`, then close cleanly (FIN)
    drip       send the whole body, correct, at `bytes_per_s`
    corrupt    flip the byte at `offset` of the body; the length stays right, only a digest notices

The last four shape a body, so they take their turn only on a 2xx answer with a body (not HEAD):
an auth challenge or a 404 on the way passes through as is. `plan()` swaps the plan while the
proxy runs (blackhole first, heal later). Every request lands in `seen` before its answer goes
out, with its Range header, the fault that took it and the body bytes sent. The old flags
(`fail_first`..., `cut_first`, `corrupt_when`) build the same plan; `redirect` answers 307.

`BlobStore` is a plain file server standing in for a registry's storage backend. Both servers
wake and join their handler threads on exit, so nothing outlives the `with` block.
"""

from __future__ import annotations

import dataclasses
import fcntl
import http.client
import json
import socket
import struct
import sys
import termios
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from enum import StrEnum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

COPY_CHUNK_BYTES = 64 * 1024
UPSTREAM_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.05  # how often serve_forever looks for a shutdown request
STOP_TIMEOUT_S = 5.0  # how long __exit__ waits for woken handlers to finish
DRAIN_TIMEOUT_S = 2.0  # how long a reset waits for the client to take the bytes it is owed
DRIP_TICK_S = 0.02  # a drip sends a slice about this often
NO_ANSWER = 0  # Seen.status of a request that was never answered (blackhole)
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


class FaultKind(StrEnum):
    FORWARD = "forward"
    STORM = "storm"
    BLACKHOLE = "blackhole"
    RESET = "reset"
    TRUNCATE = "truncate"
    DRIP = "drip"
    CORRUPT = "corrupt"


SHAPES_BODY = frozenset({FaultKind.RESET, FaultKind.TRUNCATE, FaultKind.DRIP, FaultKind.CORRUPT})


@dataclass(frozen=True)
class Fault:
    """One line of a fault plan: what to do (`kind` and its parameters), to which requests, how often.

    Build one with the class methods; parameters a kind does not use are ignored.
    """

    kind: FaultKind
    when: PathRule = always
    times: int | None = None  # the first `times` matching requests; None: every one
    status: int = 503  # storm: the answer
    headers: tuple[tuple[str, str], ...] = ()  # storm: extra headers (Retry-After)
    after_bytes: int | None = None  # reset, truncate: body bytes sent before the cut; None: half the body
    bytes_per_s: float = 0.0  # drip: the pace
    offset: int = 0  # corrupt: which body byte is flipped

    def __post_init__(self) -> None:
        if self.times is not None and self.times < 0:
            raise ValueError(f"times must be None or >= 0, not {self.times}")
        if self.kind is FaultKind.DRIP and self.bytes_per_s <= 0:
            raise ValueError(f"a drip needs bytes_per_s > 0, not {self.bytes_per_s}")
        if min(self.after_bytes or 0, self.offset) < 0:
            raise ValueError("after_bytes and offset count bytes from 0")

    @classmethod
    def forward(cls, *, when: PathRule = always, times: int | None = None) -> Fault:
        """Pass matching requests through untouched (ahead of other faults: spare the first `times`)."""
        return cls(FaultKind.FORWARD, when, times)

    @classmethod
    def storm(
        cls,
        status: int = 503,
        *,
        retry_after: int | str | None = None,
        headers: Mapping[str, str] | None = None,
        when: PathRule = always,
        times: int | None = None,
    ) -> Fault:
        """Answer `status` with a registry error body (and Retry-After if given) instead of forwarding."""
        extra = dict(headers or {}) | ({"Retry-After": str(retry_after)} if retry_after is not None else {})
        return cls(FaultKind.STORM, when, times, status=status, headers=tuple(extra.items()))

    @classmethod
    def blackhole(cls, *, when: PathRule = always, times: int | None = None) -> Fault:
        """Read the request and never answer; the connection stays open until the client or the proxy leaves."""
        return cls(FaultKind.BLACKHOLE, when, times)

    @classmethod
    def reset(cls, after_bytes: int | None = None, *, when: PathRule = always, times: int | None = None) -> Fault:
        """Send the headers and `after_bytes` of the body (None: half), then abort the connection with RST."""
        return cls(FaultKind.RESET, when, times, after_bytes=after_bytes)

    @classmethod
    def truncate(cls, after_bytes: int | None = None, *, when: PathRule = always, times: int | None = None) -> Fault:
        """Announce the full Content-Length, send `after_bytes` (None: half), then close cleanly with FIN."""
        return cls(FaultKind.TRUNCATE, when, times, after_bytes=after_bytes)

    @classmethod
    def drip(
        cls,
        *,
        bytes_per_s: float | None = None,
        every_s: float | None = None,
        when: PathRule = always,
        times: int | None = None,
    ) -> Fault:
        """Send the body at `bytes_per_s`, or one byte `every_s` seconds: k bytes take at least k / rate."""
        if bytes_per_s is None and every_s is not None:
            bytes_per_s = 1.0 / every_s
        elif bytes_per_s is None or every_s is not None:
            raise ValueError("a drip takes bytes_per_s or every_s, not both")
        return cls(FaultKind.DRIP, when, times, bytes_per_s=bytes_per_s)

    @classmethod
    def corrupt(cls, offset: int = 0, *, when: PathRule = always, times: int | None = None) -> Fault:
        """Flip every bit of the body byte at `offset` (nothing if the body is shorter)."""
        return cls(FaultKind.CORRUPT, when, times, offset=offset)


@dataclass(frozen=True)
class Seen:
    """One request the proxy got and what it answered."""

    method: str
    path: str
    status: int  # NO_ANSWER (0) for a blackholed request
    authorization: str | None
    range: str | None = None  # the request's Range header
    sent_bytes: int = 0  # body bytes handed to the client
    fault: FaultKind | None = None  # the fault that took this request, None if it was simply forwarded


@dataclass
class _Line:
    """A fault of the running plan and its turns left (None: unlimited)."""

    fault: Fault
    left: int | None


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer on 127.0.0.1:<free port> that wakes and joins its handlers on stop.

    Every client connection, and every socket a handler registers with `watch`, is shut down on
    stop: a handler blocked reading or writing one returns at once.
    """

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self._loop = threading.Thread(target=self.serve_forever, args=(POLL_INTERVAL_S,), daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        """Stop accepting, cut every open connection, and wait for the handlers to finish."""
        if self._loop.is_alive():
            self.shutdown()
        self.stopping.set()
        with self._lock:
            sockets, handlers = list(self._sockets), list(self._handlers)
        for sock in sockets:
            _shut(sock)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for thread in handlers:
            thread.join(max(0.0, deadline - time.monotonic()))
        self.server_close()
        stuck = [thread.name for thread in handlers if thread.is_alive()]
        if stuck:
            raise RuntimeError(f"handler threads still running {STOP_TIMEOUT_S}s after stop: {stuck}")

    @contextmanager
    def watch(self, sock: socket.socket) -> Iterator[None]:
        """Shut `sock` down if the server stops while the block runs."""
        with self._lock:
            self._sockets.add(sock)
        if self.stopping.is_set():
            _shut(sock)
        try:
            yield
        finally:
            with self._lock:
                self._sockets.discard(sock)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._serve_one, args=(request, client_address), daemon=True)
        with self._lock:
            self._handlers.add(thread)
        thread.start()

    def _serve_one(self, request: socket.socket, client_address: Any) -> None:
        try:
            with self.watch(request):
                self.process_request_thread(request, client_address)  # closes `request` at the end
        finally:
            with self._lock:
                self._handlers.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that went away, or stop() cutting it off
        super().handle_error(request, client_address)


def _shut(sock: socket.socket) -> None:
    with suppress(OSError):  # already closed, or never connected
        sock.shutdown(socket.SHUT_RDWR)


def _unsent_bytes(sock: socket.socket) -> int:
    """Bytes in the socket's send queue that the peer has not acknowledged yet (Linux SIOCOUTQ)."""
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0])


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class FlakyProxy:
    """A fault-injecting forwarder to `upstream` ("host:port"); see the module docstring."""

    def __init__(
        self,
        upstream: str,
        *,
        faults: tuple[Fault, ...] = (),
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
        self.redirect = redirect
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._lines: list[_Line] = []
        legacy = []
        if fail_first:
            legacy.append(Fault.storm(fail_status, headers=fail_headers, when=fail_when, times=fail_first))
        if cut_first:
            legacy.append(Fault.truncate(when=cut_when, times=cut_first))
        if corrupt_when is not None:
            legacy.append(Fault.corrupt(0, when=corrupt_when))
        self.plan(*faults, *legacy)
        self._server = _Server(self._handler())

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The plan now in force."""
        with self._lock:
            return tuple(line.fault for line in self._lines)

    def plan(self, *faults: Fault) -> None:
        """Replace the fault plan, turns counted afresh; safe while the proxy runs. No faults: forward all."""
        with self._lock:
            self._lines = [_Line(fault, fault.times) for fault in faults]

    def count(self, rule: PathRule = always) -> int:
        """How many requests the proxy got that `rule` selects."""
        return sum(1 for s in self.seen if rule(s.method, s.path))

    def __enter__(self) -> FlakyProxy:
        self._server.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.stop()

    def _pick(self, method: str, path: str) -> _Line | None:
        """The first line that matches and has turns left; a line that does not shape a body uses one now."""
        with self._lock:
            for line in self._lines:
                if line.left != 0 and line.fault.when(method, path):
                    if line.fault.kind not in SHAPES_BODY and line.left is not None:
                        line.left -= 1
                    return line
        return None

    def _use(self, line: _Line) -> bool:
        """Take a turn of a body-shaping line, once the answer turned out to have a body to shape."""
        with self._lock:
            if line.left == 0:
                return False  # another request took the last turn meanwhile
            if line.left is not None:
                line.left -= 1
            return True

    def _record(self, seen: Seen) -> Seen:
        with self._lock:
            self.seen.append(seen)
        return seen

    def _amend(self, old: Seen, sent_bytes: int) -> None:
        with self._lock:
            for i in range(len(self.seen) - 1, -1, -1):
                if self.seen[i] is old:
                    self.seen[i] = dataclasses.replace(old, sent_bytes=sent_bytes)
                    return

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # a drip's small writes go out when written

            def _record(self, status: int, sent_bytes: int, fault: FaultKind | None) -> Seen:
                headers = self.headers
                return proxy._record(
                    Seen(self.command, self.path, status, headers.get("Authorization"), headers.get("Range"),
                         sent_bytes, fault)
                )

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                line = proxy._pick(self.command, self.path)
                kind = line.fault.kind if line is not None else None
                if line is not None and kind is FaultKind.STORM:
                    self._storm(line.fault)
                elif kind is FaultKind.BLACKHOLE:
                    self._blackhole()
                elif proxy.redirect is not None and (target := proxy.redirect(self.path)) is not None:
                    self._record(307, 0, None)
                    self.send_response(307)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self._forward(body, line, forced=kind is FaultKind.FORWARD)

            def _storm(self, fault: Fault) -> None:
                data = _error_body("UNAVAILABLE", "injected failure")
                self._record(fault.status, len(data), FaultKind.STORM)
                self.send_response(fault.status)
                for name, value in fault.headers:
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _blackhole(self) -> None:
                self._record(NO_ANSWER, 0, FaultKind.BLACKHOLE)
                try:
                    while self.connection.recv(COPY_CHUNK_BYTES):
                        pass  # until the client leaves, or stop() shuts the socket and recv returns b""
                except OSError:
                    pass

            def _forward(self, body: bytes | None, line: _Line | None, *, forced: bool) -> None:
                conn = http.client.HTTPConnection(proxy.upstream, timeout=UPSTREAM_TIMEOUT_S)
                try:
                    conn.connect()
                except OSError as exc:
                    data = _error_body("UNAVAILABLE", f"proxy: upstream {proxy.upstream}: {exc}")
                    self._record(502, len(data), None)
                    self.send_response(502)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                try:
                    with proxy._server.watch(conn.sock):
                        self._relay(conn, body, line, forced=forced)
                finally:
                    conn.close()

            def _relay(
                self, conn: http.client.HTTPConnection, body: bytes | None, line: _Line | None, *, forced: bool
            ) -> None:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
                headers["Host"] = proxy.upstream
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read() if resp.getheader("Content-Length") is None else None
                total = len(data) if data is not None else int(resp.getheader("Content-Length") or 0)
                has_body = self.command != "HEAD" and 200 <= resp.status < 300
                fault = line.fault if line is not None and has_body and not forced and proxy._use(line) else None
                cut = None
                if fault is not None and fault.kind in (FaultKind.RESET, FaultKind.TRUNCATE):
                    cut = min(total, fault.after_bytes if fault.after_bytes is not None else total // 2)
                planned = 0 if self.command == "HEAD" else total if cut is None else cut
                taken_by = FaultKind.FORWARD if forced else fault.kind if fault is not None else None
                seen = self._record(resp.status, planned, taken_by)
                self.send_response(resp.status)
                for name, value in resp.getheaders():
                    if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                        self.send_header(name, value)
                self.send_header("Content-Length", str(total))
                self.end_headers()
                chunks = iter([data]) if data is not None else iter(lambda: resp.read(COPY_CHUNK_BYTES), b"")
                sent = self._send_body(chunks, fault, cut)
                if sent != planned:
                    proxy._amend(seen, sent)  # the client went away, or upstream sent less than it announced
                if fault is not None and fault.kind is FaultKind.RESET:
                    self._reset()

            def _send_body(self, chunks: Iterator[bytes], fault: Fault | None, cut: int | None) -> int:
                """Copy the body to the client, shaped by `fault`; returns the bytes handed over."""
                sent, started = 0, time.monotonic()
                try:
                    for chunk in chunks:
                        piece = chunk if cut is None else chunk[: cut - sent]
                        if fault is not None and fault.kind is FaultKind.CORRUPT:
                            piece = _flip(piece, fault.offset - sent)
                        if fault is not None and fault.kind is FaultKind.DRIP:
                            sent = self._drip(piece, sent, started, fault.bytes_per_s)
                        else:
                            self.wfile.write(piece)
                            sent += len(piece)
                        if cut is not None and sent >= cut:
                            break
                except (OSError, http.client.HTTPException):
                    pass  # a side went away, or the proxy stops: `sent` says how far it got
                return sent

            def _drip(self, data: bytes, sent: int, started: float, bytes_per_s: float) -> int:
                """Write `data` in slices so that byte k of the body leaves no sooner than k / rate."""
                step = max(1, int(bytes_per_s * DRIP_TICK_S))
                for start in range(0, len(data), step):
                    piece = data[start : start + step]
                    due = started + (sent + len(piece)) / bytes_per_s
                    if proxy._server.stopping.wait(max(0.0, due - time.monotonic())):
                        raise ConnectionAbortedError("the proxy stops")
                    self.wfile.write(piece)
                    sent += len(piece)
                return sent

            def _reset(self) -> None:
                """Abort the connection with RST once the client holds the bytes it was sent."""
                deadline = time.monotonic() + DRAIN_TIMEOUT_S
                try:
                    while _unsent_bytes(self.connection) and time.monotonic() < deadline:
                        if proxy._server.stopping.wait(0.005):
                            break
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    return  # the client is gone already
                self.rfile.close()  # drop the last reference besides the socket, so close() closes now
                self.connection.close()

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _flip(piece: bytes, at: int) -> bytes:
    """`piece` with every bit of byte `at` inverted, if `at` falls inside it."""
    if not 0 <= at < len(piece):
        return piece
    return piece[:at] + bytes([piece[at] ^ 0xFF]) + piece[at + 1 :]


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
