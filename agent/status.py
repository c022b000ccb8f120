"""Report: the phase enum, the immutable status snapshot, and the Unix-socket server and client."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from os import getpid  # the Snapshot field "os" shadows the module inside the class
from pathlib import Path
from typing import Any

from agent.errors import ExitCode

SOCKET_FILE = "/run/nvidia-agent/status.sock"
MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT_S = 2.0


class Phase(StrEnum):
    STARTING = "starting"
    DETECTING = "detecting"
    RESOLVING = "resolving"
    PULLING = "pulling"
    VERIFYING = "verifying"
    INSTALLING = "installing"
    ACTIVATING = "activating"  # switching `current`
    MOUNTING = "mounting"
    LOADING = "loading"
    UNITS = "units"
    READY = "ready"
    NO_GPU = "no-gpu"
    DEGRADED = "degraded"
    FAILED = "failed"

    @property
    def exit_code(self) -> ExitCode:
        if self in (Phase.READY, Phase.NO_GPU):
            return ExitCode.OK
        if self is Phase.FAILED:
            return ExitCode.FAILED
        return ExitCode.DEGRADED


@dataclass(frozen=True)
class LastError:
    message: str
    hint: str | None
    causes: tuple[str, ...]
    transient: bool
    at: float


@dataclass(frozen=True)
class Snapshot:
    """Everything `nvidia-agent status` shows; replaced whole on every change."""

    phase: Phase = Phase.STARTING
    phase_since: float = field(default_factory=time.time)
    detail: str = ""
    os: str | None = None
    kernel: str | None = None
    kernel_changed_from: str | None = None
    gpus: tuple[str, ...] = ()
    driver: str | None = None
    os_key: str | None = None
    image: str | None = None
    digest: str | None = None
    install_path: str | None = None
    current: str | None = None
    mount: str | None = None
    modules: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()
    last_error: LastError | None = None
    started_at: float = field(default_factory=time.time)
    last_reconcile_at: float | None = None
    ready_since: float | None = None
    next_attempt_at: float | None = None
    pid: int = field(default_factory=getpid)
    version: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def evolve(self, **changes: Any) -> Snapshot:
        if "phase" in changes and changes["phase"] != self.phase:
            changes.setdefault("phase_since", time.time())
        return replace(self, **changes)


class StatusServer:
    """Answers `status` requests on a Unix socket from a thread; reads the latest snapshot."""

    def __init__(self, path: Path, snapshot: Any) -> None:
        self.path = path
        self._snapshot = snapshot  # a callable returning the current Snapshot
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # We hold the daemon lock, so any socket file here is stale.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o117)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(16)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._serve, name="status-socket", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._sock is not None  # noqa: S101
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn, contextlib.suppress(OSError):
                self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(REQUEST_TIMEOUT_S)
        data = b""
        while b"\n" not in data and len(data) <= MAX_REQUEST_BYTES:
            chunk = conn.recv(MAX_REQUEST_BYTES)
            if not chunk:
                break
            data += chunk
        reply = handle_request(data[:MAX_REQUEST_BYTES + 1], self._snapshot())
        conn.sendall(json.dumps(reply).encode() + b"\n")

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def handle_request(data: bytes, snap: Snapshot) -> dict[str, Any]:
    """The protocol: one JSON line `{"command": "status"}` in, one JSON line out."""
    if len(data) > MAX_REQUEST_BYTES:
        return {"ok": False, "error": f"request larger than {MAX_REQUEST_BYTES} bytes"}
    try:
        request = json.loads(data.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        return {"ok": False, "error": "request is not JSON"}
    if not isinstance(request, dict) or request.get("command") != "status":
        return {"ok": False, "error": "unknown command; supported: status"}
    return {"ok": True, "status": snap.to_json()}


def query(path: Path, timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask the daemon for its status. Raises OSError when it is not reachable."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(b'{"command": "status"}\n')
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply = json.loads(data)
    if not reply.get("ok"):
        raise OSError(reply.get("error", "daemon refused the request"))
    status: dict[str, Any] = reply["status"]
    return status


def render_text(status: dict[str, Any]) -> str:
    """Human text for `nvidia-agent status`."""
    def ago(ts: float | None) -> str:
        if not ts:
            return "never"
        secs = max(0, int(time.time() - ts))
        return f"{secs}s ago" if secs < 120 else f"{secs // 60}m ago"

    lines = [f"phase:       {status['phase']} (since {ago(status['phase_since'])})"]
    if status.get("detail"):
        lines.append(f"detail:      {status['detail']}")
    kernel = status.get("kernel") or "?"
    if status.get("kernel_changed_from"):
        kernel += f" (changed from {status['kernel_changed_from']})"
    lines += [
        f"os:          {status.get('os') or '?'}",
        f"kernel:      {kernel}",
        f"gpus:        {', '.join(status.get('gpus') or []) or 'none found'}",
        f"driver:      {status.get('driver') or '?'}",
        f"image:       {status.get('image') or '-'}",
        f"digest:      {status.get('digest') or '-'}",
        f"target:      {status.get('install_path') or '-'}",
        f"current:     {status.get('current') or '-'}",
        f"mount:       {status.get('mount') or '-'}",
    ]
    if status.get("modules"):
        lines.append("modules:     " + ", ".join(f"{k} {v}" for k, v in sorted(status["modules"].items())))
    if status.get("devices"):
        lines.append("devices:     " + " ".join(status["devices"]))
    err = status.get("last_error")
    if err:
        lines.append(f"last error:  {err['message']} ({ago(err['at'])})")
        for cause in err.get("causes", [])[1:]:
            lines.append(f"  caused by: {cause}")
        if err.get("hint"):
            lines.append(f"  to fix:    {err['hint']}")
    if status.get("next_attempt_at"):
        lines.append(f"next try:    in {max(0, int(status['next_attempt_at'] - time.time()))}s")
    lines.append(f"agent:       pid {status['pid']}, version {status['version']}, "
                 f"last reconcile {ago(status.get('last_reconcile_at'))}")
    return "\n".join(lines)
