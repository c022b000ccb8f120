"""nvidia-persistenced: started from the installed tree when it ships one, once."""

from __future__ import annotations

import os
from pathlib import Path

from agent import subp

PID_FILE = "/run/nvidia-persistenced/nvidia-persistenced.pid"


def running(pid_file: Path, proc: Path) -> int | None:
    """The PID of a live nvidia-persistenced per its pid file, else None."""
    try:
        pid = int(pid_file.read_text().strip())
        comm = (proc / str(pid) / "comm").read_text().strip()
    except (OSError, ValueError):
        return None
    return pid if comm.startswith("nvidia-persist") else None


def ensure_persistenced(tree: Path, host_root: Path) -> int | str:
    """Start the tree's nvidia-persistenced unless one runs; returns its PID or why it was not started."""
    binary = tree / "bin/nvidia-persistenced"
    if not binary.is_file():
        return "not shipped by this driver image"
    pid = running(host_root / PID_FILE.lstrip("/"), host_root / "proc")
    if pid is not None:
        return pid
    if host_root != Path("/"):
        return "not started under a host root other than /"
    (host_root / PID_FILE.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    # The real daemon forks and writes its pid file; a stand-in may not, so never wait for it.
    return subp.spawn([str(binary), "--verbose"], env={**os.environ, "PATH": f"{tree / 'bin'}:/usr/sbin:/usr/bin"})
