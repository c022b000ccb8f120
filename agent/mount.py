"""Mount: a read-only overlay that shows the active tree's lib64 under /usr/lib64, then ldconfig."""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

from agent import subp
from agent.errors import HostError
from agent.hostfacts import Mount

MOUNT_SOURCE = "nvidia-agent"  # the source field that marks our overlay in mountinfo
_FORBIDDEN = (",", ":", "\n", "\\")


class MountState(StrEnum):
    OURS = "ours"  # our overlay with the expected lower directory
    STALE = "stale"  # our overlay, but of another tree
    ABSENT = "absent"  # nothing of ours at the target


def classify(top: Mount | None, lower: str) -> MountState:
    """Decide from the topmost mount at the target whether ours is there and current."""
    if top is None or top.fs_type != "overlay" or top.source != MOUNT_SOURCE:
        return MountState.ABSENT
    first_lower = top.options.get("lowerdir", "").split(":", 1)[0]
    return MountState.OURS if first_lower == lower else MountState.STALE


def overlay_options(lower: str, target: str) -> str:
    """`ro,lowerdir=<tree lib64>:<target>`: the driver's files win, the host's stay visible."""
    for path in (lower, target):
        if any(c in path for c in _FORBIDDEN):
            raise HostError(f"cannot overlay {path!r}: ',', ':' and '\\' are not allowed in overlay paths")
    return f"ro,lowerdir={lower}:{target}"


def mount_overlay(lower: Path, target: Path, run: Callable[..., subp.Completed] = subp.run) -> None:
    if not target.is_dir():
        raise HostError(f"overlay target {target} is not a directory",
                        hint="set mount.target to the host's library directory (e.g. /usr/lib64)")
    if not lower.is_dir():
        raise HostError(f"{lower} is missing: the installed tree has no lib64")
    run(["mount", "-t", "overlay", MOUNT_SOURCE, "-o", overlay_options(str(lower), str(target)), str(target)])


def unmount(target: Path, run: Callable[..., subp.Completed] = subp.run) -> None:
    """Unmount our overlay; if it is busy (libraries mapped), detach it lazily."""
    try:
        run(["umount", str(target)])
    except subp.SubpError:
        run(["umount", "--lazy", str(target)])


def ldconfig(root: Path, run: Callable[..., subp.Completed] = subp.run) -> None:
    """Refresh the host's linker cache (for a host root other than /, through `ldconfig -r`)."""
    argv = ["ldconfig"] if root == Path("/") else ["ldconfig", "-r", str(root)]
    run(argv)
