"""The daemon: one lock, the status socket, reconcile at start and on triggers, back off on failure."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

import structlog

from agent.errors import AgentError, ExitCode
from agent.reconcile import Agent
from agent.status import Phase, StatusServer

LOCK_FILE = "/run/nvidia-agent/agent.lock"

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

def next_delay_s(failures: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: initial, 2x, 4x, ... capped at max."""
    if failures <= 0:
        return 0.0
    return float(min(max_s, initial_s * (2 ** min(failures - 1, 30))))

@dataclass
class Triggers:
    """What wakes the main loop: stop (SIGTERM/SIGINT) or reconcile now (SIGHUP)."""

    stop: threading.Event
    wake: threading.Event

    @classmethod
    def install(cls) -> Triggers:
        t = cls(threading.Event(), threading.Event())

        def on_stop(signum: int, _: FrameType | None) -> None:
            t.stop.set()
            t.wake.set()

        def on_hup(signum: int, _: FrameType | None) -> None:
            t.wake.set()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        return t

def run_daemon(agent: Agent, *, socket_path: Path, once: bool, triggers: Triggers,
               clock: Callable[[], float] | None = None) -> ExitCode:
    """Serve status and reconcile until stopped (or once). Returns the exit status."""

    now = clock or time.time
    log = structlog.get_logger("nvidia-agent")
    server = StatusServer(socket_path, lambda: agent.snapshot)
    server.start()
    log.info("started", socket=str(socket_path), once=once, pid=os.getpid())
    failures = 0
    try:
        while True:
            phase = agent.reconcile(cancelled=triggers.stop.is_set)
            if once or triggers.stop.is_set():
                return phase.exit_code
            if phase in (Phase.READY, Phase.NO_GPU):
                failures = 0
                delay = agent.settings.daemon.check_interval_s
            else:
                failures += 1
                delay = next_delay_s(failures, agent.settings.daemon.retry_initial_s, agent.settings.daemon.retry_max_s)
                agent.snapshot = agent.snapshot.evolve(next_attempt_at=now() + delay)
            triggers.wake.wait(delay)
            triggers.wake.clear()
            if triggers.stop.is_set():
                return ExitCode.OK
    finally:
        server.stop()
        # Modules and the mount stay: a stopping agent must not take GPUs from running workloads.
        log.info("stopped", phase=agent.snapshot.phase.value)
