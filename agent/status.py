"""Report: the phase enum, the immutable status snapshot, and the Unix-socket server and client."""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from os import getpid  # the Snapshot field "os" shadows the module inside the class
from pathlib import Path
from typing import Any

from agent.errors import ExitCode

SOCKET_FILE = "/run/nvidia-agent/status.sock"
MAX_REQUEST_BYTES = 4096
REQUEST_TIMEOUT_S = 2.0  # a client has this long to send its request and read the reply
MAX_CLIENTS = 64
ACCEPT_BACKOFF_S = 0.2

# A command beside `status` that changes what the daemon does: given the request, it answers
# {"ok": ..., ...}. Only root's connections may send one (SO_PEERCRED); `status` is for every
# member of the socket's group.
Command = Callable[[dict[str, Any]], dict[str, Any]]


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
    driver: str | None = None  # the configured version
    active_driver: str | None = None  # the version of the tree `current` names (a fallback's, when one serves)
    last_ready_at: float | None = None  # when a pass last ended ready, from the state file across restarts
    os_key: str | None = None
    image: str | None = None
    digest: str | None = None
    install_path: str | None = None
    current: str | None = None
    serving: str | None = None  # degraded, but this working tree stays loaded and mounted (READY was sent)
    mount: str | None = None
    modules: dict[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ()
    last_error: LastError | None = None
    started_at: float = field(default_factory=time.time)
    last_reconcile_at: float | None = None
    ready_since: float | None = None
    next_attempt_at: float | None = None
    # The next boot an OS update staged, and its driver: {"os_key", "kernel", "source", "state"
    # (staging | ready | missing | failed), "tree", "detail"}; None while no update is staged.
    next_boot: dict[str, str] | None = None
    # The FleetLock reboot gate (update.gate_listen): {"listen", "upstream", "hold", "last"}; None: no gate.
    gate: dict[str, Any] | None = None
    # `nvidia-agent rollback` holds: {"tree": what runs, "instead_of": the configured tree}
    pinned: dict[str, str] | None = None
    # `status --events`: the last phase changes and errors, oldest first: {"at", "after_s" (how long the
    # phase before lasted), "phase", "detail" | "error", "hint"}
    events: tuple[dict[str, Any], ...] = ()
    # while pulling: {"done_bytes", "total_bytes", "percent", "rate_bps", "eta_s"} (None before a rate is known)
    progress: dict[str, Any] | None = None
    pid: int = field(default_factory=getpid)
    version: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def evolve(self, **changes: Any) -> Snapshot:
        if "phase" in changes and changes["phase"] != self.phase:
            changes.setdefault("phase_since", time.time())
        return replace(self, **changes)


class StatusServer:
    """Answers `status` requests on a Unix socket from one thread, for many clients at once.

    A selector multiplexes the listener and every client: a client that sends slowly, or
    never, holds only its own connection, and only for REQUEST_TIMEOUT_S; at most MAX_CLIENTS
    are served at a time (the rest wait in the listen backlog for a free slot); an accept()
    that fails (EMFILE, ...) pauses accepting for a moment instead of ending the thread.
    `stop()` returns at once.
    """

    def __init__(self, path: Path, snapshot: Callable[[], Snapshot],
                 on_error: Callable[[str, Exception], None] = lambda _what, _exc: None,
                 commands: Mapping[str, Command] | None = None) -> None:
        self.path = path
        self._snapshot = snapshot
        self._commands = dict(commands or {})
        self._on_error = on_error
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        # We hold the daemon lock, so any socket file here is stale.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o117)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(MAX_CLIENTS)
        sock.setblocking(False)
        self._sock = sock
        self._thread = threading.Thread(target=self._run, name="status-socket", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """Serve until stopped; a bug in one round is reported and the server goes on."""
        while not self._stopping:
            try:
                self._serve()
            except Exception as exc:  # whatever it was, `status` must keep answering
                self._on_error("serve", exc)
                time.sleep(ACCEPT_BACKOFF_S)

    def _serve(self) -> None:
        assert self._sock is not None  # noqa: S101
        listener = self._sock
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ)
        sel.register(listener, selectors.EVENT_READ)
        clients: dict[socket.socket, _Client] = {}
        paused_until: float | None = None  # accept() failed: try again then
        listening = True
        try:
            while not self._stopping:
                now = time.monotonic()
                if paused_until is not None and now >= paused_until:
                    paused_until = None
                want = paused_until is None and len(clients) < MAX_CLIENTS
                if want and not listening:
                    sel.register(listener, selectors.EVENT_READ)
                elif listening and not want:
                    sel.unregister(listener)
                listening = want
                deadlines = [c.deadline for c in clients.values()] + ([paused_until] if paused_until else [])
                timeout = max(0.0, min(deadlines) - now) if deadlines else None
                for key, _ in sel.select(timeout):
                    if key.fileobj is self._wake_r:
                        return
                    if key.fileobj is listener:
                        if not self._accept(listener, sel, clients):
                            paused_until = time.monotonic() + ACCEPT_BACKOFF_S
                        continue
                    conn = key.fileobj
                    assert isinstance(conn, socket.socket)  # noqa: S101
                    client = clients[conn]
                    if not client.step(conn, self._snapshot, self._commands):
                        self._drop(conn, sel, clients)
                    elif client.outbox is not None and key.events != selectors.EVENT_WRITE:
                        sel.modify(conn, selectors.EVENT_WRITE)
                now = time.monotonic()
                for conn in [c for c, state in clients.items() if state.deadline <= now]:
                    self._drop(conn, sel, clients)
        finally:
            for conn in list(clients):
                self._drop(conn, sel, clients)
            sel.close()

    def _accept(self, listener: socket.socket, sel: selectors.BaseSelector,
                clients: dict[socket.socket, _Client]) -> bool:
        """Take every waiting connection; False when accept() failed and accepting should pause."""
        while len(clients) < MAX_CLIENTS:
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return True
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM: a resource limit, not an end
                self._on_error("accept", exc)
                return False
            conn.setblocking(False)
            clients[conn] = _Client(time.monotonic() + REQUEST_TIMEOUT_S, _peer_uid(conn))
            sel.register(conn, selectors.EVENT_READ)
        return True

    @staticmethod
    def _drop(conn: socket.socket, sel: selectors.BaseSelector, clients: dict[socket.socket, _Client]) -> None:
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        clients.pop(conn, None)
        conn.close()

    def stop(self) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self._sock is not None:
            self._sock.close()
        self._wake_r.close()
        self._wake_w.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _peer_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid as the kernel saw it at connect() (unix(7) SO_PEERCRED)."""
    try:
        _pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                               struct.calcsize("3i")))
    except OSError:
        return None
    return int(uid)


class _Client:
    """One connection: read a request line, then write the reply, before `deadline`."""

    def __init__(self, deadline: float, uid: int | None = None) -> None:
        self.deadline = deadline
        self.uid = uid
        self.inbox = b""
        self.outbox: memoryview | None = None

    def step(self, conn: socket.socket, snapshot: Callable[[], Snapshot],
             commands: Mapping[str, Command] | None = None) -> bool:
        """Read or write what the socket allows now; False once the connection is done."""
        try:
            if self.outbox is None:
                chunk = conn.recv(MAX_REQUEST_BYTES + 1)
                self.inbox += chunk
                if chunk and b"\n" not in self.inbox and len(self.inbox) <= MAX_REQUEST_BYTES:
                    return True
                reply = handle_request(self.inbox[:MAX_REQUEST_BYTES + 1], snapshot(), uid=self.uid,
                                       commands=commands or {})
                self.outbox = memoryview(json.dumps(reply).encode() + b"\n")
            sent = conn.send(self.outbox)
            self.outbox = self.outbox[sent:]
        except BlockingIOError:
            return True
        except OSError:
            return False
        return len(self.outbox) > 0


def handle_request(data: bytes, snap: Snapshot, *, uid: int | None = None,
                   commands: Mapping[str, Command] | None = None) -> dict[str, Any]:
    """The protocol: one JSON line `{"command": "status"}` (or another command) in, one JSON line out."""
    if len(data) > MAX_REQUEST_BYTES:
        return {"ok": False, "error": f"request larger than {MAX_REQUEST_BYTES} bytes"}
    try:
        request = json.loads(data.split(b"\n", 1)[0] or b"{}")
    except ValueError:
        return {"ok": False, "error": "request is not JSON"}
    commands = commands or {}
    name = request.get("command") if isinstance(request, dict) else None
    if name == "status":
        return {"ok": True, "status": snap.to_json()}
    if not isinstance(name, str) or name not in commands:
        return {"ok": False, "error": "unknown command; supported: " + ", ".join(["status", *sorted(commands)])}
    if uid != 0:
        return {"ok": False, "error": f"{name} is for root only (this connection is uid {uid})"}
    try:
        return commands[name](request)
    except Exception as exc:  # a bug in one command must not end the server's thread
        return {"ok": False, "error": f"{name}: {type(exc).__name__}: {exc}"}


def ask(path: Path, request: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any]:
    """One request to the daemon, its reply. Raises OSError when it is not reachable, ValueError on a
    reply that is not JSON."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(str(path))
        sock.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    reply: Any = json.loads(data)
    if not isinstance(reply, dict):
        raise ValueError("the daemon's reply is not a JSON object")
    return reply


def query(path: Path, timeout_s: float = 5.0) -> dict[str, Any]:
    """Ask the daemon for its status. Raises OSError when it is not reachable."""
    reply = ask(path, {"command": "status"}, timeout_s)
    if not reply.get("ok"):
        raise OSError(reply.get("error", "daemon refused the request"))
    status: dict[str, Any] = reply["status"]
    return status


def render_progress(progress: dict[str, Any]) -> str:
    """`42% 120/290 MiB, 12.0 MiB/s, 14s left` (rate and time left once they are known)."""
    mib = 1 << 20
    text = (f"{progress.get('percent', 0):.0f}% {progress.get('done_bytes', 0) / mib:.0f}/"
            f"{progress.get('total_bytes', 0) / mib:.0f} MiB")
    if progress.get("rate_bps"):
        text += f", {progress['rate_bps'] / mib:.1f} MiB/s"
    if progress.get("eta_s") is not None:
        text += f", {progress['eta_s']:.0f}s left"
    return text


def render_events(status: dict[str, Any]) -> str:
    """`nvidia-agent status --events`: one line per phase change or error, oldest first."""
    lines = []
    for event in status.get("events") or ():
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(event.get("at", 0))))
        took = f"after {float(event.get('after_s', 0)):.1f}s"
        if "error" in event:
            hint = f" ({event['hint']})" if event.get("hint") else ""
            lines.append(f"{when}  {event.get('phase', '?'):<11} {took}: {event['error']}{hint}")
        else:
            detail = f": {event['detail']}" if event.get("detail") else ""
            lines.append(f"{when}  {event.get('phase', '?'):<11} {took}{detail}")
    return "\n".join(lines) if lines else "no events yet"


def render_text(status: dict[str, Any]) -> str:
    """Human text for `nvidia-agent status`."""
    def ago(ts: float | None) -> str:
        if not ts:
            return "never"
        secs = max(0, int(time.time() - ts))
        return f"{secs}s ago" if secs < 120 else f"{secs // 60}m ago"

    lines = [f"phase:       {status['phase']} (since {ago(status['phase_since'])})"]
    if status.get("progress"):
        lines.append(f"progress:    {render_progress(status['progress'])}")
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
        *([f"serving:     {status['serving']} (the previous driver, kept working)"] if status.get("serving") else []),
        *([f"rolled back: to {status['pinned']['tree']} instead of {status['pinned']['instead_of']} "
           "(nvidia-agent rollback --undo)"] if status.get("pinned") else []),
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
    nb = status.get("next_boot")
    if nb:
        lines.append(f"next boot:   {nb.get('state')}: {nb.get('os_key')} (from {nb.get('source')})")
        if nb.get("detail"):
            lines.append(f"             {nb['detail']}")
    gate = status.get("gate")
    if gate:
        lines.append(f"reboot gate: {gate.get('listen')}"
                     + (f" -> {gate['upstream']}" if gate.get("upstream") else "")
                     + (f", holding for {gate['hold']['os_key']} since {ago(gate['hold']['since'])}"
                        if gate.get("hold") else ""))
        last = gate.get("last")
        if last:
            lines.append(f"             last {last.get('operation')} {ago(last.get('at'))}: "
                         f"{'granted' if last.get('granted') else 'refused'}: {last.get('reason')}")
    if status.get("next_attempt_at"):
        lines.append(f"next try:    in {max(0, int(status['next_attempt_at'] - time.time()))}s")
    lines.append(f"agent:       pid {status['pid']}, version {status['version']}, "
                 f"last reconcile {ago(status.get('last_reconcile_at'))}")
    return "\n".join(lines)
