"""The driver's tools on the operator's PATH: links in a bin directory that go through `current`.

    /opt/bin/nvidia-smi -> /opt/nvidia/current/bin/nvidia-smi

A link names `current`, not a tree, so it switches with `current` in the same rename. The agent
owns only the links it makes, exactly `<root>/current/bin/<tool>`: a file, or any other link (a
distribution's nvidia-smi, an operator's link to one tree), is never touched. A tool the current
tree lacks, or every tool when no tree is current, has its link removed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from agent.errors import HostError
from agent.install.fs import os_error

# What the driver ships for operators and what the GPU operator's validator runs by name.
TOOLS = (
    "nvidia-smi",
    "nvidia-persistenced",
    "nvidia-modprobe",
    "nvidia-cuda-mps-control",
    "nvidia-cuda-mps-server",
    "nvidia-debugdump",
    "nvidia-bug-report.sh",
)
FLATCAR_BIN = "/opt/bin"  # on PATH and writable on Flatcar, where /usr is read-only
DEFAULT_BIN = "/usr/local/bin"  # plain distros, Fedora CoreOS (/usr/local -> /var/usrlocal)


def bin_dir_for(setting: str, os_id: str) -> str | None:
    """install.bin_dir: "auto" picks by OS, "" turns links off, else the absolute path given."""
    if setting == "auto":
        return FLATCAR_BIN if os_id == "flatcar" else DEFAULT_BIN
    return setting or None


@dataclass(frozen=True)
class LinkChanges:
    """What to do in the bin directory: (tool, link target) to make, tools whose link goes, and
    tools left alone because something not ours has the name."""

    make: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()
    foreign: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.make or self.remove)


def plan_links(install_root: str, present: frozenset[str] | None, found: Mapping[str, str | None]) -> LinkChanges:
    """Pure: the changes that make the bin directory show the tools in `present` (the current
    tree's, None when no tree is current). `found` maps each tool name to what its path holds:
    the link's target, "" for anything that is not a link, None when absent."""
    base = PurePosixPath(install_root)
    make, remove, foreign = [], [], []
    for tool in TOOLS:
        link = str(base / "current/bin" / tool)
        want = link if present is not None and tool in present else None
        have = found.get(tool)
        ours = have == link
        if have is not None and not ours:
            if want is not None:
                foreign.append(tool)
            continue
        if want is not None and have != want:
            make.append((tool, want))
        elif want is None and ours:
            remove.append(tool)
    return LinkChanges(tuple(make), tuple(remove), tuple(foreign))


def tools_in(tree: Path) -> frozenset[str]:
    """The known tools a tree's bin/ holds as regular executable files."""
    found = set()
    for tool in TOOLS:
        with contextlib.suppress(OSError):
            st = (tree / "bin" / tool).lstat()
            if st.st_mode & 0o170000 == 0o100000 and st.st_mode & 0o111:
                found.add(tool)
    return frozenset(found)


def read_links(bin_dir: Path) -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for tool in TOOLS:
        path = bin_dir / tool
        try:
            found[tool] = os.readlink(path)
        except (FileNotFoundError, NotADirectoryError):
            found[tool] = None  # absent (making it will say why, if bin_dir itself is unusable)
        except OSError:
            found[tool] = ""  # exists, not a link (EINVAL), or unreadable: not ours either way
    return found


def apply_links(bin_dir: Path, changes: LinkChanges) -> None:
    """Each link is made under a temporary name and renamed over its path: never half there."""
    try:
        if changes.make:
            bin_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        for tool, target in changes.make:
            tmp = bin_dir / f".{tool}.nvidia-agent"
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            tmp.symlink_to(target)
            try:
                tmp.rename(bin_dir / tool)
            except OSError:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        for tool in changes.remove:
            with contextlib.suppress(FileNotFoundError):
                (bin_dir / tool).unlink()
    except OSError as exc:
        error = os_error(exc, f"cannot link the driver's tools into {bin_dir}")
        raise HostError(error.message, hint=error.hint or 'set install.bin_dir to a writable directory on PATH, '
                        'or to "" for no links') from exc
