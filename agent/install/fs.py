"""Filesystem work the install step trusts: deep-tree removal without recursion, syncfs, OS errors with hints."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from collections.abc import Callable
from pathlib import Path

from agent.errors import HostError

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

# What an operator can do about the errors a filesystem gives an install.
_HINTS = {
    errno.ENOSPC: "the filesystem is full: free space there, or point install.root at a larger filesystem",
    errno.EDQUOT: "a disk quota is exhausted: raise it, or point install.root elsewhere",
    errno.EROFS: "the filesystem is read-only: point install.root at a writable filesystem (e.g. under /var or /opt)",
    errno.EACCES: "permission denied: the agent must run as root",
    errno.EPERM: "operation not permitted: the agent must run as root, without a sandbox that forbids this",
    errno.EIO: "an I/O error: check the disk (dmesg, smartctl)",
    errno.ENAMETOOLONG: "a path is too long for this filesystem",
    errno.EMFILE: "too many open files: raise LimitNOFILE= for the agent",
}


def os_error(exc: OSError, what: str) -> HostError:
    """An OSError as a HostError that says what failed, the system's words, and what to do."""
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return HostError(f"{what}: {reason}{where}", hint=_HINTS.get(exc.errno or 0))


SPACE_RESERVE_BYTES = 64 << 20  # left free beyond what an image needs (at most a twentieth of the filesystem)


def free_bytes(path: Path) -> tuple[int, int, int]:
    """(device, bytes an unprivileged writer may still use, size) of the filesystem holding `path`
    or, while it does not exist yet, its nearest existing parent."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return os.stat(probe).st_dev, st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize


def check_space(needs: list[tuple[Path, int, str]],
                free: Callable[[Path], tuple[int, int, int]] = free_bytes) -> None:
    """Refuse, before a download, what the filesystems cannot hold: `needs` is (where, bytes, what
    for); needs on one filesystem add up, and a reserve stays free (64 MiB, or a twentieth of a
    small filesystem). HostError naming each filesystem short of space."""
    by_device: dict[int, tuple[int, int, int, list[str]]] = {}
    for where, need, what in needs:
        device, available, size = free(where)
        total, _, reserve, whats = by_device.get(device, (0, available, min(SPACE_RESERVE_BYTES, size // 20), []))
        by_device[device] = (total + need, available, reserve, [*whats, f"{what} in {where} ({_mib(need)})"])
    short = [entry for entry in by_device.values() if entry[0] + entry[2] > entry[1]]
    if short:
        total, available, reserve, whats = short[0]
        raise HostError(f"not enough free space: {' and '.join(whats)} need {_mib(total + reserve)} "
                        f"with a {_mib(reserve)} reserve; {_mib(available)} free",
                        hint="free space there (old trees go with a lower install.keep_trees; the blob cache "
                             "with a lower install.cache_max_mib), or point install.root elsewhere")


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def remove_tree(path: Path) -> None:
    """Remove `path` and everything under it, however deep, never following a symlink.

    Iterative: each directory below the top is emptied by moving its entries one level up
    (rename within the tree) before it is removed, so depth costs neither recursion nor
    open files. A missing `path` is fine; any other failure raises OSError.
    """
    parent = os.open(path.parent, _DIR_FLAGS)
    try:
        try:
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if not stat.S_ISDIR(st.st_mode):
            os.unlink(path.name, dir_fd=parent)
            return
        top = os.open(path.name, _DIR_FLAGS, dir_fd=parent)
        try:
            empty_dir(top)
        finally:
            os.close(top)
        os.rmdir(path.name, dir_fd=parent)
    finally:
        os.close(parent)


def empty_dir(top: int) -> None:
    """Remove everything inside the directory open as `top` (see remove_tree)."""
    serial = 0
    while True:
        with os.scandir(top) as it:
            entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        if not entries:
            return
        for name, is_dir in entries:
            if not is_dir:
                os.unlink(name, dir_fd=top)
                continue
            child = os.open(name, _DIR_FLAGS, dir_fd=top)
            try:
                with os.scandir(child) as it:
                    grandchildren = [e.name for e in it]
                for g in grandchildren:
                    serial += 1
                    while True:  # a fresh name in `top`, taken from nothing that exists there
                        fresh = f".rm-{serial}"
                        try:
                            os.stat(fresh, dir_fd=top, follow_symlinks=False)
                        except FileNotFoundError:
                            break
                        serial += 1
                    os.rename(g, fresh, src_dir_fd=child, dst_dir_fd=top)
            finally:
                os.close(child)
            os.rmdir(name, dir_fd=top)


def try_remove_tree(path: Path) -> OSError | None:
    """remove_tree that reports instead of raising: cleaning up must never fail the agent."""
    try:
        remove_tree(path)
    except OSError as exc:
        return exc
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL | None:
    """The C library, for the calls Python does not wrap (syncfs, renameat2)."""
    global _libc  # noqa: PLW0603 - loaded once per process
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name, use_errno=True) if name else None
    return _libc


def syncfs(path: Path) -> None:
    """Flush the one filesystem that holds `path`, not every mount as sync(2) would: a dead NFS
    mount elsewhere must not hang an install. Raises OSError if the filesystem reports a write error."""
    lib = libc()
    fn = getattr(lib, "syncfs", None) if lib is not None else None
    if fn is None:  # pragma: no cover - every glibc and musl since 2011 has syncfs
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if fn(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
