"""Persisted state and per-tree markers, written atomically (tmp + fsync + rename + fsync dir)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

STATE_FILE = "/var/lib/nvidia-agent/state.json"
TREE_MARKER = ".nvidia-agent.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class TreeMarker:
    """Written into a tree just before it is renamed into place: what it is and where it came from."""

    driver: str
    os_key: str
    kernel: str
    reference: str
    digest: str
    installed_at: float


def read_marker(tree: Path) -> TreeMarker | None:
    """The marker of an installed tree, or None if the tree is absent or not ours."""
    try:
        doc = json.loads((tree / TREE_MARKER).read_bytes())
        return TreeMarker(**{k: doc[k] for k in TreeMarker.__dataclass_fields__})
    except (OSError, ValueError, KeyError, TypeError):
        return None


def marker_bytes(marker: TreeMarker) -> bytes:
    return json.dumps(asdict(marker), indent=2, sort_keys=True).encode() + b"\n"


@dataclass(frozen=True)
class State:
    """What the agent remembers between runs (everything else is read off the host)."""

    last_kernel: str | None = None
    last_os_key: str | None = None
    last_ready_at: float | None = None
    previous_kernel: str | None = None  # the kernel before the last change the agent handled
    kernel_changed_at: float | None = None


def load_state(path: Path) -> State:
    """A missing or unreadable state file is an empty state: the host is the source of truth."""
    try:
        doc: Any = json.loads(path.read_bytes())
        return State(**{k: doc.get(k) for k in State.__dataclass_fields__})
    except (OSError, ValueError, TypeError, AttributeError):
        return State()


def save_state(path: Path, state: State) -> None:
    write_atomic(path, json.dumps(asdict(state), indent=2, sort_keys=True).encode() + b"\n")
