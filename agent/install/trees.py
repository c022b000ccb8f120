"""The installed trees under install.root: rename into place, the `current` swap, pruning, debris.

    <root>/<driver>/<os>/        a complete tree (it has a marker: only complete trees are renamed here)
    <root>/current -> <driver>/<os>
    <root>/.staging-*, .trash-*, .current.tmp-*   debris of an interrupted install, removed by the next pass
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path

from agent import failpoints
from agent.errors import HostError
from agent.install import fs
from agent.state import TreeMarker, read_marker

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
CURRENT = "current"
CURRENT_TMP_PREFIX = f".{CURRENT}.tmp-"
DEBRIS_PREFIXES = (STAGING_PREFIX, TRASH_PREFIX, CURRENT_TMP_PREFIX)
RENAME_EXCHANGE = 2

Report = Callable[[Path, OSError | None], None]


def remove_debris(install_root: Path, report: Report) -> None:
    """Remove what an interrupted install left (the caller holds the agent's lock).

    Never raises: debris that cannot be removed is reported with its error, and the install
    goes on (each attempt stages under a fresh name).
    """
    try:
        entries = [e for e in install_root.iterdir() if e.name.startswith(DEBRIS_PREFIXES)]
    except FileNotFoundError:
        return
    except OSError as exc:
        report(install_root, exc)
        return
    for entry in entries:
        report(entry, fs.try_remove_tree(entry))


def move_into_place(staging: Path, tree: Path, install_root: Path) -> None:
    """Rename staging to `tree`; an existing tree is exchanged atomically, then removed."""
    tree.parent.mkdir(parents=True, exist_ok=True)
    if not tree.exists():
        staging.rename(tree)
    elif _renameat2_exchange(staging, tree):
        pass  # staging now holds the old tree; the caller removes it
    else:
        trash = install_root / f"{TRASH_PREFIX}{tree.parent.name}-{tree.name}-{os.getpid()}"
        tree.rename(trash)
        staging.rename(tree)
        fs.try_remove_tree(trash)
    failpoints.hit("install.renamed")
    fs.fsync_dir(tree.parent)
    fs.fsync_dir(install_root)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    lib = fs.libc()
    fn = getattr(lib, "renameat2", None) if lib is not None else None
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    import ctypes  # noqa: PLC0415 - only for the errno of a failed exchange

    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS):
        return False  # the filesystem cannot exchange: fall back to two renames
    raise HostError(f"exchange {a} with {b}: {os.strerror(err)}")


def trees_to_prune(trees: list[tuple[Path, float]], keep: int, protected: set[Path], driver: str) -> list[Path]:
    """Trees beyond `keep`: protected ones (the active tree) always stay, then the configured
    driver's trees newest first (the previous kernel's tree is what an OS rollback boots back
    into), then other drivers' trees newest first."""
    newest_first = sorted(trees, key=lambda t: (t[0].parent.name == driver, t[1]), reverse=True)
    kept = [p for p, _ in newest_first if p in protected]
    pruned = []
    for path, _ in newest_first:
        if path in protected:
            continue
        if len(kept) < keep:
            kept.append(path)
        else:
            pruned.append(path)
    return pruned


def installed_trees(install_root: Path) -> list[tuple[Path, TreeMarker]]:
    """Every complete tree (one with a marker) under <install_root>/<driver>/<os>, with its marker."""
    found = []
    if install_root.is_dir():
        for driver_dir in install_root.iterdir():
            if driver_dir.name.startswith(".") or driver_dir.is_symlink() or not driver_dir.is_dir():
                continue
            for tree in driver_dir.iterdir():
                marker = read_marker(tree) if tree.is_dir() and not tree.is_symlink() else None
                if marker is not None:
                    found.append((tree, marker))
    return found


def prune_trees(install_root: Path, keep: int, protected: set[Path], driver: str, report: Report) -> list[Path]:
    """Remove old trees (renamed to trash first, so a crash mid-delete leaves only debris)."""
    ages = [(tree, marker.installed_at) for tree, marker in installed_trees(install_root)]
    pruned = trees_to_prune(ages, keep, protected, driver)
    for tree in pruned:
        trash = install_root / f"{TRASH_PREFIX}{tree.parent.name}-{tree.name}-{os.getpid()}"
        tree.rename(trash)
        failpoints.hit("prune.trashed")
        error = fs.try_remove_tree(trash)
        if error is not None:
            report(trash, error)
        with contextlib.suppress(OSError):
            tree.parent.rmdir()  # the driver directory, once empty
    return pruned


def current_target(install_root: Path) -> Path | None:
    """Where `current` points (as a path under install_root), or None."""
    link = install_root / CURRENT
    try:
        return install_root / os.readlink(link)
    except OSError:
        return None


def switch_current(install_root: Path, tree: Path) -> None:
    """Point `current` at `tree` atomically: a new relative symlink renamed over the old one."""
    rel = os.path.relpath(tree, install_root)
    if rel.startswith(".."):
        raise HostError(f"{tree} is not under {install_root}")
    tmp = install_root / f"{CURRENT_TMP_PREFIX}{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(rel)
    failpoints.hit("current.link")
    try:
        tmp.replace(install_root / CURRENT)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot switch {install_root / CURRENT} to {rel}: {exc.strerror}") from exc
    fs.fsync_dir(install_root)
    failpoints.hit("current.switched")
