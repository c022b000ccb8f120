"""A small HTTP server for loopback endpoints (the reboot gate, the metrics): one thread per
connection, at most MAX_CLIENTS at once, each cut off REQUEST_DEADLINE_S after it starts, so a
client that sends one byte every few seconds, or nothing, holds only its own slot, and not for
long; no reverse DNS lookup at bind; a broken connection is one logged line."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog

from agent.errors import HostError

CLIENT_TIMEOUT_S = 5.0  # a client has this long for each read
REQUEST_DEADLINE_S = 30.0  # and this long for its whole request and answer
MAX_CLIENTS = 8  # connections served at once; more are closed at once


class BoundedServer(ThreadingHTTPServer):
    """See the module docstring."""

    allow_reuse_address = True
    daemon_threads = True
    block_on_close = False
    error_event = "http_request_failed"

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, handler)

    def server_bind(self) -> None:
        """As HTTPServer's, without its reverse DNS lookup (getfqdn) of the address."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: this client tries again later
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        timer = threading.Timer(REQUEST_DEADLINE_S, _cut, (request,))
        timer.daemon = True
        timer.start()
        try:
            super().process_request_thread(request, client_address)
        finally:
            timer.cancel()
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """One broken connection is logged, not printed to stderr; the server goes on."""
        structlog.get_logger("nvidia-agent").warning(self.error_event, client=str(client_address),
                                                     error=traceback.format_exc(limit=3))


class BoundedServer6(BoundedServer):
    address_family = socket.AF_INET6


def parse_address(value: str, *, loopback_only: bool) -> tuple[str, int]:
    """'127.0.0.1:9797' or '[::1]:9797' -> (address, port). ValueError unless an IP address (a loopback one
    when `loopback_only`) and a port."""
    import ipaddress  # noqa: PLC0415 - only for config validation

    kind = "a loopback address" if loopback_only else "an IP address"
    host, sep, port = value.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise ValueError(f"{kind} and port such as \"127.0.0.1:9797\"")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        if loopback_only and not ipaddress.ip_address(host).is_loopback:
            raise ValueError
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{kind} and port such as \"127.0.0.1:9797\"") from None
    return host, int(port)


def serve(address: str, port: int, handler: type[BaseHTTPRequestHandler], *, name: str, error_event: str,
          key: str) -> BoundedServer:
    """A BoundedServer on address:port (IPv6 when the address has a colon), serving in a daemon thread `name`.
    HostError, naming the configuration `key`, when the address cannot be bound."""
    cls = type("Server", (BoundedServer6 if ":" in address else BoundedServer,), {"error_event": error_event})
    try:
        server: BoundedServer = cls((address, port), handler)
    except OSError as exc:
        raise HostError(f"{name}: cannot listen on {address}:{port}: {exc.strerror}",
                        hint=f"another service holds the port? set {key} to a free one") from None
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5}, name=name, daemon=True).start()
    return server


def _cut(conn: socket.socket) -> None:
    """The request's time is up: its reads and writes fail at once, its thread ends."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
