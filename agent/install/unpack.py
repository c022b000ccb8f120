"""Extract image layers into a staging tree: only /nvidia-driver/, OCI whiteouts applied, escapes refused."""

from __future__ import annotations

import gzip
import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import IO

from agent.errors import Cancelled, ImageRejected

gzip_reader: ModuleType
try:  # ISA-L inflates ~2x faster than zlib, and inflate dominates an install (bench/pull_install.py)
    from isal import igzip as gzip_reader
except ImportError:  # pragma: no cover - a platform without an isal wheel falls back to zlib
    gzip_reader = gzip

TREE_PREFIX = "nvidia-driver"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_TREE_BYTES = 16 << 30
MAX_MEMBERS = 200_000
CHUNK_BYTES = 1 << 20
STREAM_BUFFER_BYTES = 1 << 20  # tarfile reads the stream in records of this size (its default, 10 KiB, is slow)
GZIP_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
})
TAR_TYPES = frozenset({"application/vnd.oci.image.layer.v1.tar"})


class Staging:
    """A tree under construction. Records the sha256 of every regular file it writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digests: dict[str, str] = {}  # relative path -> "sha256:..."
        self.total_bytes = 0
        self.members = 0

    def extract_layer(self, blob: Path, media_type: str, *, cancelled: Callable[[], bool] = lambda: False) -> None:
        """Apply one layer (a verified blob on disk) on top of the tree."""
        if media_type in GZIP_TYPES:
            raw: IO[bytes] = gzip_reader.open(blob, "rb")
        elif media_type in TAR_TYPES:
            raw = blob.open("rb")
        else:
            raise ImageRejected(f"layer media type {media_type!r} is not supported",
                                hint="build the image with tar or tar+gzip layers")
        created: set[str] = set()
        try:
            with raw, tarfile.open(fileobj=raw, mode="r|", bufsize=STREAM_BUFFER_BYTES) as tar:
                for member in tar:
                    if cancelled():
                        raise Cancelled("stopping: install abandoned")
                    self.members += 1
                    if self.members > MAX_MEMBERS:
                        raise ImageRejected(f"more than {MAX_MEMBERS} entries in the image")
                    self._apply(tar, member, created)
        except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as exc:
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            raise ImageRejected(f"layer {blob.name} is not a valid archive: {exc}") from exc

    def _apply(self, tar: tarfile.TarFile, member: tarfile.TarInfo, created: set[str]) -> None:
        rel = tree_relative(member.name)
        if rel is None:
            return  # outside /nvidia-driver/: not ours, never written
        base = posixpath.basename(rel)
        if base == OPAQUE:
            self._opaque(posixpath.dirname(rel), created)
            return
        if base.startswith(WHITEOUT):
            self._remove(posixpath.join(posixpath.dirname(rel), base[len(WHITEOUT):]))
            return
        if member.mode & 0o7000:
            raise ImageRejected(f"{member.name}: setuid, setgid or sticky bit set (mode {member.mode:o})")
        if rel == "":
            if not member.isdir():
                raise ImageRejected(f"{member.name}: the tree root must be a directory")
            return
        dest = self._dir_for(rel) / posixpath.basename(rel)
        mode = member.mode & 0o755
        if member.isdir():
            if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
                self._remove(rel)
            dest.mkdir(mode=0o755, exist_ok=True)
            dest.chmod(mode | 0o700)
        elif member.isreg():
            self._remove(rel)
            self._write(tar, member, rel, dest, mode)
        elif member.issym():
            check_symlink(rel, member.linkname, member.name)
            self._remove(rel)
            os.symlink(member.linkname, dest)
        elif member.islnk():
            target_rel = tree_relative(member.linkname)
            if target_rel is None or target_rel == "":
                raise ImageRejected(f"{member.name}: hardlink to {member.linkname!r} outside the tree")
            target = self._dir_for(target_rel) / posixpath.basename(target_rel)
            if not (target.exists() and not target.is_symlink() and target.is_file()):
                raise ImageRejected(f"{member.name}: hardlink to {member.linkname!r}, "
                                    "which is not a file extracted before it")
            self._remove(rel)
            os.link(target, dest)
            self.digests[rel] = self.digests[target_rel]
        else:
            raise ImageRejected(f"{member.name}: {_kind(member)} not allowed in a driver tree")
        created.add(rel)

    def _write(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str, dest: Path, mode: int) -> None:
        self.total_bytes += member.size
        if self.total_bytes > MAX_TREE_BYTES:
            raise ImageRejected(f"tree larger than {MAX_TREE_BYTES >> 30} GiB")
        src = tar.extractfile(member)
        if src is None:  # pragma: no cover - isreg() members always have data
            raise ImageRejected(f"{member.name}: no data")
        digest = hashlib.sha256()
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                digest.update(chunk)
                out.write(chunk)
        os.chmod(dest, mode)
        self.digests[rel] = "sha256:" + digest.hexdigest()

    def _parents(self, rel: str, *, create: bool = True) -> Path | None:
        """The directory that holds `rel`, never reached through a symlink.

        Missing directories are created, or with create=False the answer is
        None (nothing is there to remove).
        """
        cur = self.path
        head = posixpath.dirname(rel)
        for part in head.split("/") if head else ():
            cur = cur / part
            try:
                st = cur.lstat()
            except FileNotFoundError:
                if not create:
                    return None
                cur.mkdir(mode=0o755)
                continue
            if stat.S_ISLNK(st.st_mode):
                raise ImageRejected(f"{TREE_PREFIX}/{rel}: path passes through a symlink ({part})")
            if not stat.S_ISDIR(st.st_mode):
                raise ImageRejected(f"{TREE_PREFIX}/{rel}: parent {part} is not a directory")
        return cur

    def _dir_for(self, rel: str) -> Path:
        parent = self._parents(rel)
        assert parent is not None  # noqa: S101 - create=True always returns a directory
        return parent

    def _remove(self, rel: str) -> None:
        """Delete `rel` and everything under it (a whiteout, or a replaced entry)."""
        parent = self._parents(rel, create=False)
        if parent is None:
            return
        path = parent / posixpath.basename(rel)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        prefix = rel + "/"
        for key in [k for k in self.digests if k == rel or k.startswith(prefix)]:
            del self.digests[key]

    def _opaque(self, rel_dir: str, created: set[str]) -> None:
        """`.wh..wh..opq`: hide what lower layers put in the directory, keep this layer's entries."""
        directory = self.path / rel_dir if rel_dir else self.path
        if rel_dir and self._parents(rel_dir + "/x", create=False) is None:
            return
        if directory.is_symlink() or not directory.is_dir():
            return
        for child in list(directory.iterdir()):
            child_rel = posixpath.join(rel_dir, child.name) if rel_dir else child.name
            if child_rel not in created:
                self._remove(child_rel)

    def check_links(self) -> None:
        """After all layers: every symlink, followed for real, stays inside the tree."""
        root = os.path.realpath(self.path)
        for dirpath, dirnames, filenames in os.walk(self.path):
            for name in dirnames + filenames:
                p = os.path.join(dirpath, name)
                if os.path.islink(p):
                    resolved = os.path.realpath(p)
                    if os.path.commonpath([root, resolved]) != root:
                        rel = os.path.relpath(p, self.path)
                        raise ImageRejected(f"{TREE_PREFIX}/{rel}: symlink -> {os.readlink(p)!r} "
                                            "resolves outside the tree")


def tree_relative(name: str) -> str | None:
    """The path of a layer member relative to /nvidia-driver/, None if elsewhere.

    Absolute names and `..` components are refused wherever they appear.
    """
    if name.startswith("/"):
        raise ImageRejected(f"{name}: absolute path in layer")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageRejected(f"{name}: '..' in layer path")
    if not parts or parts[0] != TREE_PREFIX:
        return None
    return "/".join(parts[1:])


def check_symlink(rel: str, target: str, name: str) -> None:
    """A symlink must be relative and, read lexically, stay inside the tree."""
    if not target or target.startswith("/"):
        raise ImageRejected(f"{name}: absolute symlink -> {target!r}", hint="driver trees use relative symlinks")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../"):
        raise ImageRejected(f"{name}: symlink -> {target!r} escapes the tree")


def _kind(member: tarfile.TarInfo) -> str:
    if member.ischr() or member.isblk():
        return "device node"
    if member.isfifo():
        return "FIFO"
    return f"entry type {member.type!r}"
