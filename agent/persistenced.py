"""nvidia-persistenced: started from the installed tree as a transient systemd unit, stopped before an unload."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from agent import subp
from agent.bus import Systemd
from agent.errors import HostError

PID_FILE = "/run/nvidia-persistenced/nvidia-persistenced.pid"
UNIT = "nvidia-persistenced.service"
STOP_TIMEOUT_S = 10.0


def running(pid_file: Path, proc: Path) -> int | None:
    """The PID of a live nvidia-persistenced per its pid file, else None."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = (proc / str(pid) / "comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm.startswith("nvidia-persist") else None


def ensure_persistenced(tree: Path, host_root: Path, systemd: Systemd) -> int | str:
    """Start the tree's nvidia-persistenced unless one runs; returns its PID or what happened."""
    binary = tree / "bin/nvidia-persistenced"
    if not binary.is_file():
        return "not shipped by this driver image"
    pid = running(host_root / PID_FILE.lstrip("/"), host_root / "proc")
    if pid is not None:
        return pid
    if host_root != Path("/"):
        return "not started under a host root other than /"
    (host_root / PID_FILE.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    argv = [str(binary), "--verbose"]
    try:
        # Its own unit: outlives agent restarts, shows in systemctl, and is not in the agent's cgroup.
        systemd.start_transient(UNIT, argv, [("Type", "forking"), ("PIDFile", PID_FILE),
                                             ("CollectMode", "inactive-or-failed"),
                                             ("Description", "NVIDIA Persistence Daemon (started by nvidia-agent)")])
    except HostError:
        return subp.spawn(argv, env={**os.environ, "PATH": f"{tree / 'bin'}:/usr/sbin:/usr/bin"})
    return f"started as {UNIT}"


def stop_persistenced(host_root: Path, systemd: Systemd) -> int | None:
    """Stop a running nvidia-persistenced (it holds /dev/nvidiactl); returns the PID that was stopped."""
    pid = running(host_root / PID_FILE.lstrip("/"), host_root / "proc")
    if pid is None:
        return None
    try:
        systemd.stop_unit(UNIT)
    except HostError:
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while (host_root / "proc" / str(pid)).exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # a process exit has no event to wait on short of pidfd; bounded
    return pid
