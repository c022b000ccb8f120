"""Install: pull a resolved image's layers, extract and verify in staging, rename into place, swap `current`."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.driverimage import VerifiedTree, verify_tree
from agent.errors import HostError
from agent.reference import Reference
from agent.registry import Platform, RegistryClient, ResolvedImage
from agent.state import TreeMarker, fsync_dir, marker_bytes, read_marker
from agent.unpack import Staging

STAGING_PREFIX = ".staging-"
TRASH_PREFIX = ".trash-"
CURRENT = "current"
RENAME_EXCHANGE = 2


@dataclass(frozen=True)
class InstallResult:
    tree: Path
    image: ResolvedImage
    verified: VerifiedTree
    marker: TreeMarker


def remove_debris(install_root: Path) -> list[Path]:
    """Staging and trash directories left by an interrupted install (we hold the lock)."""
    removed = []
    if install_root.is_dir():
        for entry in install_root.iterdir():
            if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def install_image(
    registry: RegistryClient,
    ref: Reference,
    *,
    platform: Platform,
    install_root: Path,
    tree: Path,
    blob_cache: Path,
    driver: str,
    os_key: str,
    kernel: str,
    on_phase: Callable[[str, dict[str, Any]], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> InstallResult:
    """Resolve, pull, verify and install `ref` at `tree` (a directory under `install_root`).

    Nothing outside the staging directory changes until the final rename; on
    any failure the staging directory is removed and `tree` is as before.
    """
    on_phase("resolving", {"reference": str(ref)})
    image = registry.resolve(ref, platform)
    on_phase("pulling", {"digest": image.reference.digest, "layers": len(image.layers),
                         "bytes": sum(d.size for d in image.layers)})
    blob_cache.mkdir(parents=True, exist_ok=True)
    blobs = []
    for desc in image.layers:
        blob = blob_cache / desc.digest.replace(":", "-")
        if not blob.is_file():
            registry.fetch_blob(image.reference, desc, blob, cancelled=cancelled)
        blobs.append((blob, desc.media_type))

    on_phase("verifying", {"digest": image.reference.digest})
    install_root.mkdir(parents=True, exist_ok=True)
    staging = Staging(install_root / f"{STAGING_PREFIX}{tree.parent.name}-{tree.name}-{os.getpid()}")
    try:
        staging.path.mkdir(mode=0o755)
        for blob, media_type in blobs:
            staging.extract_layer(blob, media_type, cancelled=cancelled)
        staging.check_links()
        verified = verify_tree(staging.path, staging.digests, driver_version=driver, kernel=kernel)
        marker = TreeMarker(driver=driver, os_key=os_key, kernel=kernel, reference=str(ref),
                            digest=image.reference.digest or "", installed_at=time.time())
        (staging.path / ".nvidia-agent.json").write_bytes(marker_bytes(marker))
        on_phase("installing", {"tree": str(tree)})
        staging.path.chmod(0o755)
        os.sync()  # the tree's data must be on disk before the rename makes it visible
        tree.parent.mkdir(parents=True, exist_ok=True)
        _move_into_place(staging.path, tree, install_root)
        fsync_dir(tree.parent)
    finally:
        if staging.path.exists():
            shutil.rmtree(staging.path, ignore_errors=True)
    for blob, _ in blobs:
        blob.unlink(missing_ok=True)  # the installed tree is the cache from now on
    return InstallResult(tree, image, verified, marker)


def _move_into_place(staging: Path, tree: Path, install_root: Path) -> None:
    """Rename staging to `tree`; an existing tree is exchanged atomically, then removed."""
    if not tree.exists():
        staging.rename(tree)
        return
    if _renameat2_exchange(staging, tree):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old tree
        return
    trash = install_root / f"{TRASH_PREFIX}{tree.parent.name}-{tree.name}-{os.getpid()}"
    tree.rename(trash)
    staging.rename(tree)
    shutil.rmtree(trash, ignore_errors=True)


def _renameat2_exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
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


def installed_trees(install_root: Path) -> list[tuple[Path, float]]:
    """Every complete tree (one with a marker) under <install_root>/<driver>/<os>."""
    found = []
    if install_root.is_dir():
        for driver_dir in install_root.iterdir():
            if driver_dir.name.startswith(".") or driver_dir.is_symlink() or not driver_dir.is_dir():
                continue
            for tree in driver_dir.iterdir():
                marker = read_marker(tree) if tree.is_dir() and not tree.is_symlink() else None
                if marker is not None:
                    found.append((tree, marker.installed_at))
    return found


def prune_trees(install_root: Path, keep: int, protected: set[Path], driver: str) -> list[Path]:
    """Remove old trees (renamed to trash first, so a crash mid-delete leaves only debris)."""
    pruned = trees_to_prune(installed_trees(install_root), keep, protected, driver)
    for tree in pruned:
        trash = install_root / f"{TRASH_PREFIX}{tree.parent.name}-{tree.name}-{os.getpid()}"
        tree.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
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
    tmp = install_root / f".{CURRENT}.tmp-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    tmp.symlink_to(rel)
    try:
        tmp.replace(install_root / CURRENT)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise HostError(f"cannot switch {install_root / CURRENT} to {rel}: {exc.strerror}") from exc
    fsync_dir(install_root)
