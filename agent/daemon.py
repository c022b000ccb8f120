"""The daemon: one lock, the status socket, reconcile at start and on triggers, back off on failure."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO

import structlog

from agent.errors import AgentError, ExitCode
from agent.notify import Notifier
from agent.reconcile import Agent
from agent.status import Phase, StatusServer

LOCK_FILE = "/run/nvidia-agent/agent.lock"
# Fault injection for the watchdog test: after READY, the main loop stops for this long without pinging.
WEDGE_ENV = "NVIDIA_AGENT_TEST_WEDGE_S"


class LockHeld(AgentError):
    """Another nvidia-agent daemon runs on this host root."""


def acquire_lock(path: Path) -> IO[str]:
    """An exclusive flock held for the process's life; the file names the holder's PID."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise LockHeld(f"another nvidia-agent (pid {holder}) holds {path}",
                       hint="stop it first (systemctl stop nvidia-agent)") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def process_age_s(proc: Path = Path("/proc")) -> float:
    """Seconds since this process started (/proc/self/stat starttime against /proc/uptime); 0 if unknown."""
    try:
        fields = (proc / "self/stat").read_text().rsplit(")", 1)[1].split()
        started_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc_pid_stat(5)
        uptime_s = float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime_s - started_s)


def next_delay_s(failures: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x, 4x, ... capped at max."""
    if failures <= 0:
        return 0.0
    return float(min(max_s, initial_s * (2 ** min(failures - 1, 30))))


class Triggers:
    """What wakes the main loop: stop (SIGTERM/SIGINT) or reconcile now (SIGHUP).

    Signal handlers only set flags: a handler that took a lock (threading.Event.set) could
    deadlock against the very wait it interrupts. The wake-up goes through a socketpair that
    signal.set_wakeup_fd writes to from C, and the loop waits on it with select.
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self.reconcile_requested = False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)

    @classmethod
    def install(cls) -> Triggers:
        t = cls()

        def on_stop(signum: int, _: FrameType | None) -> None:
            t.stop_requested = True

        def on_hup(signum: int, _: FrameType | None) -> None:
            t.reconcile_requested = True

        signal.set_wakeup_fd(t._w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        return t

    def request_stop(self) -> None:
        """From another thread (tests): stop as a SIGTERM would."""
        self.stop_requested = True
        self._poke()

    def _poke(self) -> None:
        with contextlib.suppress(BlockingIOError):
            self._w.send(b"\0")

    def wait(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, or until a signal or a request arrives."""
        if self.stop_requested or self.reconcile_requested:
            return
        ready, _, _ = select.select([self._r], [], [], max(0.0, timeout_s))
        if ready:
            with contextlib.suppress(BlockingIOError):
                while self._r.recv(4096):
                    pass


class Readiness:
    """READY=1 goes out once: when the driver works (or there is no GPU), or at the deadline, degraded."""

    def __init__(self, notifier: Notifier, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 started_ago_s: float = 0.0) -> None:
        self.notifier = notifier
        # Counted from process start: interpreter start-up is part of what units ordered after us wait for.
        self.deadline = clock() + timeout_s - started_ago_s
        self.timeout_s = timeout_s
        self.sent = False
        self._clock = clock

    def update(self, phase: Phase, status: str) -> str | None:
        """Send READY=1 if it is time; returns 'ready' or 'degraded' when it was sent now."""
        if self.sent:
            return None
        if phase in (Phase.READY, Phase.NO_GPU):
            self.sent = True
            self.notifier.send(READY="1", STATUS=f"{phase.value}: {status}")
            return "ready"
        if self._clock() >= self.deadline:
            self.sent = True
            self.notifier.send(READY="1", STATUS=f"degraded: {status}")
            return "degraded"
        return None

    def wait_cap_s(self) -> float | None:
        """How long the loop may sleep before the deadline needs a look."""
        return None if self.sent else max(0.0, self.deadline - self._clock())


def run_daemon(agent: Agent, *, socket_path: Path, once: bool, triggers: Triggers,
               notifier: Notifier | None = None) -> ExitCode:
    """Serve status and reconcile until stopped (or once). Returns the exit status."""
    log = structlog.get_logger("nvidia-agent")
    notifier = notifier or Notifier(None)
    agent.notify = notifier.status
    readiness = Readiness(notifier, agent.settings.daemon.ready_timeout_s, started_ago_s=process_age_s())
    server = StatusServer(socket_path, lambda: agent.snapshot)
    server.start()
    log.info("started", socket=str(socket_path), once=once, pid=os.getpid(),
             watchdog_s=notifier.watchdog_s, ready_timeout_s=readiness.timeout_s)

    def still_going() -> bool:
        """Polled between chunks of long work: keeps the watchdog fed from the main loop."""
        notifier.ping_if_due()
        return triggers.stop_requested

    failures = 0
    try:
        while True:
            phase = agent.reconcile(cancelled=still_going)
            sent = readiness.update(phase, agent.snapshot.detail or phase.value)
            if sent == "degraded":
                log.warning("ready_degraded", waited_s=readiness.timeout_s, phase=phase.value,
                            reason=agent.snapshot.detail, detail="units ordered after nvidia-agent start now; "
                            "retrying in the background")
            if once or triggers.stop_requested:
                return phase.exit_code
            if phase in (Phase.READY, Phase.NO_GPU):
                failures = 0
                delay = agent.settings.daemon.check_interval_s
            else:
                failures += 1
                delay = next_delay_s(failures, agent.settings.daemon.retry_initial_s, agent.settings.daemon.retry_max_s)
                agent.snapshot = agent.snapshot.evolve(next_attempt_at=time.time() + delay)
            cap = readiness.wait_cap_s()
            if cap is not None:
                delay = min(delay, cap)
            if readiness.sent and os.environ.get(WEDGE_ENV):
                log.warning("test_wedge", seconds=os.environ[WEDGE_ENV])
                time.sleep(float(os.environ[WEDGE_ENV]))  # deliberately starves the watchdog
            _wait(triggers, notifier, delay)
            if triggers.stop_requested:
                return ExitCode.OK
    finally:
        notifier.send(STOPPING="1")
        server.stop()
        # Modules and the mount stay: a stopping agent must not take GPUs from running workloads.
        log.info("stopped", phase=agent.snapshot.phase.value)


def _wait(triggers: Triggers, notifier: Notifier, delay_s: float) -> None:
    """Sleep until a trigger or `delay_s` passes, pinging the watchdog on time."""
    end = time.monotonic() + delay_s
    while not (triggers.stop_requested or triggers.reconcile_requested):
        left = end - time.monotonic()
        if left <= 0:
            break
        triggers.wait(min(left, notifier.ping_interval_s or left))
        notifier.ping_if_due()
    triggers.reconcile_requested = False
