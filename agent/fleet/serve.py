"""The metrics over HTTP (export.listen): GET /metrics answers Prometheus' text format; nothing else.

Off by default (node_exporter's textfile is the first way). Served by agent.httpserve's bounded
server: a slow or malformed client holds one of a few slots for seconds at most, and never the
agent: the pass, the status socket and systemd's watchdog do not wait on it.
"""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from agent.fleet.metrics import Metrics
from agent.httpserve import CLIENT_TIMEOUT_S, BoundedServer, parse_address, serve

log = structlog.get_logger(__name__)


class MetricsServer:
    def __init__(self, listen: str, metrics: Metrics) -> None:
        self.listen = listen
        self.metrics = metrics
        self._server: BoundedServer | None = None

    def start(self) -> None:
        """Bind and serve in a thread; HostError when the address cannot be bound."""
        address, port = parse_address(self.listen, loopback_only=False)
        handler = type("Handler", (_Handler,), {"metrics": self.metrics})
        self._server = serve(address, port, handler, name="metrics", error_event="metrics_request_failed",
                             key="export.listen")
        log.info("metrics_listening", listen=self.listen)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1]) if self._server else 0

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    timeout = CLIENT_TIMEOUT_S
    server_version = "nvidia-agent-metrics"

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, b"not found: GET /metrics\n", "text/plain; charset=utf-8")
            return
        self._reply(200, self.metrics.render(), CONTENT_TYPE_LATEST)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics_request", line=format % args)
