"""Persisted state and per-tree markers, written atomically (tmp + fsync + rename + fsync dir)."""

from __future__ import annotations

import glob
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from agent.hostroot import check_host_path
from agent.install.fs import fsync_dir
from agent.update import KERNEL_RELEASE_RE

STATE_FILE = "/var/lib/nvidia-agent/state.json"
IMAGES_DIR = "/var/lib/nvidia-agent/images"  # `nvidia-agent import`: an OCI layout (agent.fetch.imported)
NEXT_KERNEL_FILE = "/var/lib/nvidia-agent/next-kernel"  # written when `stage` is asked, not at a pass
TREE_MARKER = ".nvidia-agent.json"


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace `path` with `data` so readers see the old or the new file, never a torn one.

    Temporary files an earlier process left for the same path (killed between write and
    rename) are removed first.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        # O_EXCL: never a file someone put there after the sweep (a link to another file, in a directory
        # others may write, such as an exporter's)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


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
class Refusal:
    """A tree whose modules the kernel refused: not loaded again until something changes."""

    tree: str
    digest: str
    kernel: str
    parameters: str  # the module parameters it was refused with (modules.parameters, canonical JSON)
    reason: str
    at: float

    def matches(self, tree: str, digest: str | None, kernel: str, parameters: str) -> bool:
        return (self.tree, self.digest, self.kernel, self.parameters) == (tree, digest, kernel, parameters)


@dataclass(frozen=True)
class Pin:
    """`nvidia-agent rollback`: run `tree` instead of the configured target `instead_of`, with this
    kernel, until the operator undoes it or the kernel or the configured target changes."""

    tree: str
    instead_of: str
    kernel: str
    at: float


@dataclass(frozen=True)
class State:
    """What the agent remembers between runs (everything else is read off the host)."""

    last_kernel: str | None = None
    last_os_key: str | None = None
    last_ready_at: float | None = None
    previous_kernel: str | None = None  # the kernel before the last change the agent handled
    kernel_changed_at: float | None = None
    refused: Refusal | None = None
    # The tree that was last READY for each kernel: what keeps serving if that kernel's target fails.
    working: dict[str, str] = field(default_factory=dict)
    # The tree installed for the next boot an OS update staged: kept through pruning until that boot.
    staged: str | None = None
    pinned: Pin | None = None
    # The tree that was active before the last switch (the previous boot's, after an OS update):
    # kept through pruning, so a rollback of the OS finds its driver.
    previous_tree: str | None = None


def load_state(path: Path) -> State:
    """A missing or unreadable state file is an empty state: the host is the source of truth.

    Every field is type-checked; one that is wrong is dropped, not trusted.
    """
    try:
        doc: Any = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return State()
    if not isinstance(doc, dict):
        return State()
    def text(key: str) -> str | None:
        value = doc.get(key)
        return value if isinstance(value, str) else None

    def when(key: str) -> float | None:
        value = doc.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    working = doc.get("working")
    return State(last_kernel=text("last_kernel"), last_os_key=text("last_os_key"), last_ready_at=when("last_ready_at"),
                 previous_kernel=text("previous_kernel"), kernel_changed_at=when("kernel_changed_at"),
                 refused=_refusal(doc.get("refused")),
                 working={k: v for k, v in working.items() if isinstance(k, str) and isinstance(v, str)}
                 if isinstance(working, dict) else {}, staged=_tree_path(text("staged")),
                 pinned=_pin(doc.get("pinned")), previous_tree=_tree_path(text("previous_tree")))


def _pin(doc: Any) -> Pin | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("at"), int | float):
        return None
    tree, instead_of = _tree_path(doc.get("tree")), _tree_path(doc.get("instead_of"))
    kernel = _kernel(doc.get("kernel"))
    if tree is None or instead_of is None or kernel is None:
        return None
    return Pin(tree, instead_of, kernel, float(doc["at"]))


def read_next_kernel(path: Path) -> str | None:
    """The kernel a kernel package's postinst hook said the next boot runs (`nvidia-agent stage`)."""
    try:
        return _kernel(path.read_text().strip())
    except (OSError, UnicodeDecodeError):
        return None


def write_next_kernel(path: Path, kernel: str | None) -> None:
    if kernel is None:
        path.unlink(missing_ok=True)
    else:
        write_atomic(path, kernel.encode() + b"\n")


def _kernel(value: object) -> str | None:
    return value if isinstance(value, str) and KERNEL_RELEASE_RE.match(value) else None


def _tree_path(value: object) -> str | None:
    """A tree path from the state file: absolute and normalized, or not trusted at all."""
    try:
        return None if not isinstance(value, str) or "\0" in value else str(check_host_path(value))
    except ValueError:
        return None


def _refusal(doc: Any) -> Refusal | None:
    if not isinstance(doc, dict):
        return None
    strings = ("tree", "digest", "kernel", "parameters", "reason")
    if not all(isinstance(doc.get(k), str) for k in strings) or not isinstance(doc.get("at"), int | float):
        return None
    return Refusal(**{k: doc[k] for k in strings}, at=float(doc["at"]))


def save_state(path: Path, state: State) -> None:
    write_atomic(path, json.dumps(asdict(state), indent=2, sort_keys=True).encode() + b"\n")
