"""The reboot gate (I/O): a FleetLock endpoint on loopback that grants a reboot only when the next
boot's driver is staged, then asks the fleet's own lock server, if one is configured.

    Zincati  --POST /v1/pre-reboot-->  nvidia-agent (update.gate_listen)  --same request-->  update.gate_upstream

Decisions are fleetlock.decide's; this file serves HTTP, forwards, remembers the hold and logs.
The hold (which next boot has been refused since when) lives in /run/nvidia-agent/, so an
agent restart does not restart the clock, and a reboot forgets it.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import requests
import structlog

from agent import httpserve
from agent.httpserve import CLIENT_TIMEOUT_S, BoundedServer, parse_address, serve
from agent.log import RepeatLimiter
from agent.state import write_atomic
from agent.status import Snapshot
from agent.update.fleetlock import PRE_REBOOT, PROTOCOL_HEADER, Hold, Rejection, Request, decide, parse_request

HOLD_FILE = "/run/nvidia-agent/gate-hold.json"
UPSTREAM_TIMEOUT_S = (5.0, 10.0)  # connect, each read
MAX_REPLY_BYTES = 4096
LOG_PERIOD_S = 3600.0


def boottime() -> float:
    """Seconds since boot, suspend included: the hold's clock (an NTP step does not move it; /run,
    where the hold is kept, lasts exactly one boot, like this clock)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def parse_listen(value: str) -> tuple[str, int]:
    """'127.0.0.1:9797' or '[::1]:9797' -> (address, port). ValueError unless a loopback IP and a port: the
    gate answers this host's update agent only."""
    return parse_address(value, loopback_only=True)


def upstream_url(base: str, operation: str) -> str:
    """The upstream endpoint for an operation, relative to the configured base URL."""
    return urllib.parse.urljoin(base if base.endswith("/") else base + "/", f"v1/{operation}")


class RebootGate:
    def __init__(self, listen: str, upstream: str, *, hold_max_s: float, snapshot: Callable[[], Snapshot],
                 source: str, looked: Callable[[], bool], poke: Callable[[], None], hold_file: Path,
                 clock: Callable[[], float] = boottime) -> None:
        self.listen = listen
        self.upstream = upstream
        self.hold_max_s = hold_max_s
        self.source = source  # who tells the next boot here (source_for)
        self._snapshot = snapshot
        self._looked = looked
        self._poke = poke
        self._hold_file = hold_file
        self._clock = clock
        self._lock = threading.Lock()  # one request decides at a time (the server is serial anyway)
        self._hold = self._load_hold()
        self._last: dict[str, Any] | None = None
        self._server: BoundedServer | None = None
        self._session = requests.Session()
        self._session.trust_env = False  # no proxy from the environment between two local services
        self._refusals = RepeatLimiter(LOG_PERIOD_S)
        self.log = structlog.get_logger("nvidia-agent")

    # --- lifecycle

    def start(self) -> None:
        """Bind and serve in a thread. HostError when the address cannot be bound."""
        address, port = parse_listen(self.listen)
        handler = type("Handler", (_Handler,), {"gate": self})
        self._server = serve(address, port, handler, name="reboot-gate", error_event="gate_request_failed",
                             key="update.gate_listen")
        self.log.info("gate_listening", listen=self.listen, upstream=self.upstream or None,
                      hold_max_s=self.hold_max_s)

    def stop(self) -> None:
        """Stop listening; a request in flight is not waited for (its thread is a daemon's)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self._session.close()

    def view(self) -> dict[str, Any]:
        """The gate as `status` shows it (times as wall-clock seconds)."""
        with self._lock:
            hold = None if self._hold is None else {
                "os_key": self._hold.os_key, "since": time.time() - (self._clock() - self._hold.since)}
            return {"listen": self.listen, "upstream": self.upstream or None, "hold": hold, "last": self._last}

    # --- one request

    def handle(self, path: str, protocol_header: str | None, body: bytes) -> tuple[int, bytes]:
        """(HTTP status, body) for a POST: checked, decided, forwarded when granted here."""
        request = parse_request(urllib.parse.urlsplit(path).path, protocol_header, body)
        if isinstance(request, Rejection):
            return request.status, request.body()
        if request.operation == "pre-reboot":
            with self._lock:  # not held while forwarding: `status` reads the view meanwhile
                refusal = self._pre_reboot(request)
            if refusal is not None:
                return refusal.status, refusal.body()
        return self._forward(request)

    def _pre_reboot(self, request: Request) -> Rejection | None:
        snap = self._snapshot()
        verdict = decide(snap.phase.value, bool(snap.serving), snap.next_boot, source=self.source,
                         looked=self._looked(), hold=self._hold, now=self._clock(), hold_max_s=self.hold_max_s)
        if verdict.hold != self._hold:
            self._save_hold(verdict.hold)
        self._last = {"operation": request.operation, "client": request.client_id, "granted": verdict.grant,
                      "reason": verdict.reason, "at": time.time()}
        ctx = {"client": request.client_id, "group": request.group, "reason": verdict.reason}
        if verdict.grant:
            self._refusals.forget()
            (self.log.warning if verdict.warning else self.log.info)("gate_granted", **ctx)
            return None
        assert verdict.refusal is not None  # noqa: S101 - decide() refuses with a Rejection
        if self._refusals.should_log(verdict.refusal.kind)[0]:
            self.log.warning("gate_refused", kind=verdict.refusal.kind, **ctx,
                             hint="the reboot waits for the next boot's driver; `nvidia-agent status` says why")
        if snap.next_boot is None or snap.next_boot.get("state") != "staging":
            self._poke()  # the updater may have staged just now, or the image come: look at once
        return verdict.refusal

    def _forward(self, request: Request) -> tuple[int, bytes]:
        """Granted here: the fleet's lock server has the last word, when there is one."""
        if not self.upstream:
            return 200, b""
        url = upstream_url(self.upstream, request.operation)
        deadline = time.monotonic() + httpserve.REQUEST_DEADLINE_S - CLIENT_TIMEOUT_S  # upstream included
        try:
            with self._session.post(url, data=request.body, timeout=UPSTREAM_TIMEOUT_S, allow_redirects=False,
                                    stream=True, headers={PROTOCOL_HEADER: "true",
                                                          "Content-Type": "application/json"}) as reply:
                status, content = reply.status_code, _bounded_body(reply, deadline)
        except (requests.RequestException, TimeoutError) as exc:
            self.log.warning("gate_upstream_unreachable", url=url, error=f"{type(exc).__name__}: {exc}")
            rejection = Rejection(502, "upstream_unreachable", f"the fleet lock server {url} is unreachable")
            self._note_upstream(request, False, rejection.value)
            return rejection.status, rejection.body()
        if status == 200:
            self._note_upstream(request, True, "granted by the fleet lock server")
            return 200, content
        rejection = _upstream_rejection(status, content)
        self.log.info("gate_upstream_refused", url=url, status=status, kind=rejection.kind,
                      value=rejection.value)
        self._note_upstream(request, False, f"fleet lock server: {rejection.value}")
        return rejection.status, rejection.body()

    def _note_upstream(self, request: Request, granted: bool, reason: str) -> None:
        with self._lock:
            self._last = {"operation": request.operation, "client": request.client_id, "granted": granted,
                          "reason": reason, "at": time.time()}

    # --- the hold, kept across agent restarts (not reboots)

    def _load_hold(self) -> Hold | None:
        try:
            doc = json.loads(self._hold_file.read_bytes())
            hold = Hold(str(doc["os_key"]), float(doc["since"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return hold if hold.since <= self._clock() else None  # a clock from the future is not trusted

    def _save_hold(self, hold: Hold | None) -> None:
        self._hold = hold
        try:
            if hold is None:
                self._hold_file.unlink(missing_ok=True)
            else:
                write_atomic(self._hold_file, json.dumps(asdict(hold)).encode() + b"\n", mode=0o600)
        except OSError as exc:  # the hold still counts in memory; only a restart would reset it
            self.log.warning("gate_hold_not_saved", path=str(self._hold_file), error=exc.strerror)


def _bounded_body(reply: requests.Response, deadline: float) -> bytes:
    """At most MAX_REPLY_BYTES of the body, read before `deadline` (a dripping server is cut off)."""
    body = b""
    for chunk in reply.iter_content(chunk_size=512):
        body += bytes(chunk)
        if len(body) >= MAX_REPLY_BYTES:
            return body[:MAX_REPLY_BYTES]
        if time.monotonic() > deadline:
            raise TimeoutError("the fleet lock server's answer took too long")
    return body


def _upstream_rejection(status: int, content: bytes) -> Rejection:
    """The upstream's refusal passed on as it said it; a body that is not the protocol's is named.
    Any status but 200 refuses (the spec); a 2xx or 3xx other than 200 is the server's fault: 502."""
    if status < 400:
        return Rejection(502, "upstream_unexpected_status",
                         f"the fleet lock server answered HTTP {status}, not 200 or an error")
    try:
        doc = json.loads(content[:4096])
        if isinstance(doc, dict) and isinstance(doc.get("kind"), str) and isinstance(doc.get("value"), str) \
                and doc["kind"] and doc["value"]:
            return Rejection(status, doc["kind"][:128], doc["value"][:1024])
    except ValueError:
        pass
    return Rejection(status, f"upstream_http_{status}", f"the fleet lock server answered HTTP {status}")


class _Handler(BaseHTTPRequestHandler):
    gate: RebootGate
    timeout = CLIENT_TIMEOUT_S  # a silent client holds the serial server this long at most
    server_version = "nvidia-agent-gate"

    def do_POST(self) -> None:
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):
            self._reply(*_error(Rejection(411, "length_required", "send the body with a Content-Length")))
            return
        if int(length) > 4096:
            self._reply(*_error(Rejection(413, "body_too_large", "a FleetLock body is at most 4096 bytes")))
            return
        body = self.rfile.read(int(length))
        self._reply(*self.gate.handle(self.path, self.headers.get(PROTOCOL_HEADER), body))

    def do_GET(self) -> None:
        self._reply(*_error(Rejection(405, "method_not_allowed", f"POST to {PRE_REBOOT} or /v1/steady-state")))

    do_PUT = do_DELETE = do_HEAD = do_GET

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        structlog.get_logger("nvidia-agent").debug("gate_request", line=format % args)


def _error(rejection: Rejection) -> tuple[int, bytes]:
    return rejection.status, rejection.body()
