"""Extract image layers into a staging tree: only /nvidia-driver/, OCI whiteouts applied, escapes refused.

Every filesystem call is relative to a directory file descriptor opened with O_NOFOLLOW, so
no name from an image can reach outside the staging directory: a symlink in a path is an
error (ELOOP) rather than a detour, and a whiteout can only remove what lies below the tree
root. Work is linear in the number of entries; paths, entries and bytes are capped at sizes
no driver image comes near (a real driver tree has under a thousand entries).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import gzip
import hashlib
import os
import posixpath
import stat
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any, cast

from agent.errors import Cancelled, DigestMismatch, ImageRejected
from agent.install import fs
from agent.install.pipeline import HashWorker, Prefetch, StreamHash
from agent.install.tar import CHUNK_BYTES, DIR, FILE, HARDLINK, SYMLINK, Member, TarReader


@functools.cache
def _inflater() -> tuple[ModuleType, tuple[type[Exception], ...]]:
    """The gzip reader and what it raises for a broken stream. ISA-L inflates ~2x faster than zlib, and inflate
    dominates an install (bench/run.py, docs/benchmarks.md); imported on first use (an unchanged boot reads
    trees, it never inflates one)."""
    errors: tuple[type[Exception], ...] = (EOFError, gzip.BadGzipFile, zlib.error)
    try:
        from isal import igzip, isal_zlib  # noqa: PLC0415
    except ImportError:  # pragma: no cover - a platform without an isal wheel falls back to zlib
        return gzip, errors
    return igzip, (*errors, cast("type[Exception]", isal_zlib.error))

TREE_PREFIX = "nvidia-driver"
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
MAX_TREE_ENTRIES = 10_000  # entries under /nvidia-driver/, all layers together
MAX_ARCHIVE_ENTRIES = 500_000  # every entry read, the base OS an image may carry included
MAX_TREE_BYTES = 8 << 30  # file data written into the tree
MAX_STREAM_BYTES = 32 << 30  # uncompressed bytes read, all layers together (a gzip bomb stops here)
MAX_PATH_BYTES = 1024  # a path inside the tree
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 32
MAX_LINK_HOPS = 40  # the kernel's own limit on symlinks followed in one lookup
MAX_LINK_STEPS = 1_000_000  # path components walked to check every symlink of a tree
GZIP_TYPES = frozenset({
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
})
TAR_TYPES = frozenset({"application/vnd.oci.image.layer.v1.tar"})

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class ExtractedTree:
    """What the layers left in staging, read back from the filesystem itself."""

    files: dict[str, str]  # relative path -> "sha256:..." of every regular file
    links: dict[str, str]  # relative path -> symlink target
    dirs: frozenset[str]


class _Layer:
    """A layer blob as an uncompressed stream; inflate failures are the image's fault, named as such."""

    def __init__(self, raw: IO[bytes], name: str) -> None:
        self._raw = raw
        self._name = name

    def read(self, size: int = -1) -> bytes:
        try:
            return self._raw.read(size)
        except _inflater()[1] as exc:
            raise ImageRejected(f"layer {self._name} is not a valid gzip stream: {exc}") from None

    def close(self) -> None:
        self._raw.close()


class Staging:
    """A tree under construction in a directory the agent created. Use as a context manager.

    The directory must exist and be empty; nothing outside it is ever touched.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.total_bytes = 0  # file data written
        self.stream_bytes = 0  # uncompressed bytes read
        self.members = 0  # archive entries read
        self.entries = 0  # tree entries applied
        self._root = -1
        # each file's sha256, fed by the hash thread; may hold stale paths: finish() keeps those still files
        self._digests: dict[str, Any] = {}
        self._hashes: HashWorker | None = None

    def __enter__(self) -> Staging:
        self._root = os.open(self.path, _DIR_FLAGS)
        self._hashes = HashWorker()
        return self

    def __exit__(self, *_: object) -> None:
        if self._hashes is not None:
            self._hashes.close()
            self._hashes = None
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    @property
    def hashes(self) -> HashWorker:
        assert self._hashes is not None, "use Staging as a context manager"  # noqa: S101
        return self._hashes

    # --- layers

    def extract_layer(self, blob: Path | IO[bytes], media_type: str, *, diff_id: str | None = None,
                      cancelled: Callable[[], bool] = lambda: False, name: str | None = None,
                      interrupt: Callable[[], None] = lambda: None) -> None:
        """Apply one layer (a blob on disk, or a stream of it: agent.install.layers) on top of the tree.

        `diff_id` is the image config's digest of the uncompressed layer: checked once the
        whole stream was read. `name` names the layer in errors (default: the blob's file name);
        `interrupt` wakes a read of `blob` that waits for bytes, when the extraction fails first.
        Raises ImageRejected (naming the entry) for anything the contract refuses, HostError
        (with a hint) when the filesystem fails.
        """
        name = name or (blob.name if isinstance(blob, Path) else "?")
        if media_type in GZIP_TYPES:
            stream: IO[bytes] = _inflater()[0].open(blob, "rb")
        elif media_type in TAR_TYPES:
            stream = blob.open("rb") if isinstance(blob, Path) else blob
        else:
            raise ImageRejected(f"layer media type {media_type!r} is not supported",
                                hint="build the image with tar or tar+gzip layers")
        hasher = StreamHash(self.hashes) if diff_id else None
        created: set[str] = set()  # entries this layer made: whiteouts in the same layer spare them
        opaque: set[str] = set()
        layer = _Layer(stream, name)
        ahead = Prefetch(layer.read, chunk=CHUNK_BYTES, depth=2, name="inflate", interrupt=interrupt)
        reader = TarReader(ahead, hasher=hasher, max_bytes=max(0, MAX_STREAM_BYTES - self.stream_bytes))  # type: ignore[arg-type]
        member: Member | None = None
        try:
            for member in reader:
                if cancelled():
                    raise Cancelled("stopping: install abandoned")
                self._count(member, name)
                self._apply(reader, member, created, opaque)
            self.stream_bytes += reader.offset
        except OSError as exc:
            where = f"{member.name[:200]!r}" if member is not None else f"layer {name}"
            raise fs.os_error(exc, f"extracting {where} into {self.path}") from exc
        finally:
            ahead.close()
            layer.close()
        self.hashes.drain()
        if hasher is not None and f"sha256:{hasher.digest.hexdigest()}" != diff_id:
            raise DigestMismatch(f"layer {name}: its uncompressed content has digest sha256:"
                                 f"{hasher.digest.hexdigest()}, the image config's diff_id is {diff_id}",
                                 hint="the image is corrupt or was tampered with; it was not used")

    def _count(self, member: Member, layer: str) -> None:
        self.members += 1
        if self.members > MAX_ARCHIVE_ENTRIES:
            raise ImageRejected(f"more than {MAX_ARCHIVE_ENTRIES} entries in the image's layers")
        if self.stream_bytes + member.offset + member.size > MAX_STREAM_BYTES:
            # the layer and offset too: a declared size this large is as likely a damaged header as a big file
            raise ImageRejected(f"layer {layer}, byte {member.offset}: entry {member.name[:200]!r} "
                                f"({member.size} bytes) takes the layers past {MAX_STREAM_BYTES >> 30} GiB unpacked")

    def _apply(self, reader: TarReader, member: Member, created: set[str], opaque: set[str]) -> None:
        parts = tree_parts(member.name)
        if parts is None:
            if member.name.strip("/") in (WHITEOUT + TREE_PREFIX, OPAQUE):  # the whole tree hidden
                self._clear_children([], created, repr(member.name[:200]))
            return  # outside /nvidia-driver/: not ours, never written
        name = repr(member.name[:200])
        check_tree_path(parts, name)  # whiteouts too: their directories are walked to
        base = parts[-1] if parts else ""
        if base == OPAQUE:
            rel_dir = "/".join(parts[:-1])
            if rel_dir not in opaque:
                opaque.add(rel_dir)
                self._clear_children(parts[:-1], created, name)
            return
        if base.startswith(WHITEOUT):
            target = base[len(WHITEOUT):]
            if target in ("", ".", "..") or target.startswith(WHITEOUT) or "\0" in target:
                raise ImageRejected(f"{name}: not a valid whiteout (it names {target!r})")
            rel = "/".join([*parts[:-1], target])
            if rel not in created:  # a whiteout hides lower layers only (OCI image spec)
                self._remove(parts[:-1], target, name)
            return
        if member.mode & 0o7000:
            raise ImageRejected(f"{name}: setuid, setgid or sticky bit set (mode {member.mode:o})")
        if not parts:
            if member.kind != DIR:
                raise ImageRejected(f"{name}: the tree root must be a directory")
            return
        self.entries += 1
        if self.entries > MAX_TREE_ENTRIES:
            raise ImageRejected(f"more than {MAX_TREE_ENTRIES} entries in the driver tree; "
                                "a driver image needs far fewer")
        rel = "/".join(parts)
        if member.kind not in (DIR, FILE, SYMLINK, HARDLINK):
            raise ImageRejected(f"{name}: {_KIND_NAMES.get(member.kind, member.kind)} not allowed in a driver tree")
        if member.kind == SYMLINK:
            check_symlink(rel, member.linkname, name)
        leaf = parts[-1]
        mode = member.mode & 0o755
        with self._opened(parts[:-1], created, member=name) as parent:
            assert parent is not None  # noqa: S101 - create=True makes what is missing
            if member.kind == DIR:
                self._make_dir(parent, leaf, mode)
            elif member.kind == FILE:
                self._clear(parent, leaf, rel)
                self._write(reader, member, parent, leaf, rel=rel, mode=mode)
            elif member.kind == SYMLINK:
                self._clear(parent, leaf, rel)
                os.symlink(member.linkname, leaf, dir_fd=parent)
            else:
                self._link(member, parent, leaf, rel, name)
        created.add(rel)

    # --- one entry

    def _write(self, reader: TarReader, member: Member, parent: int, leaf: str, *, rel: str, mode: int) -> None:
        self.total_bytes += member.size
        if self.total_bytes > MAX_TREE_BYTES:
            raise ImageRejected(f"{member.name[:200]!r}: the driver tree is larger than {MAX_TREE_BYTES >> 30} GiB")
        digest = hashlib.sha256()
        fd = os.open(leaf, _NEW_FILE, 0o600, dir_fd=parent)
        try:
            for view in reader.data():
                self.hashes.update(digest, view)  # a view of an immutable chunk: safe to hash later
                left = view
                while left:
                    left = left[os.write(fd, left):]
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
        self._digests[rel] = digest

    def _make_dir(self, parent: int, leaf: str, mode: int) -> None:
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            os.mkdir(leaf, 0o700, dir_fd=parent)
        else:
            if not stat.S_ISDIR(st.st_mode):
                self._unlink_or_remove(parent, leaf, st)
                os.mkdir(leaf, 0o700, dir_fd=parent)
        fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent)
        try:
            os.fchmod(fd, mode | 0o700)
        finally:
            os.close(fd)

    def _link(self, member: Member, parent: int, leaf: str, rel: str, name: str) -> None:
        try:
            target = tree_parts(member.linkname)
        except ImageRejected as exc:
            raise ImageRejected(f"{name}: hardlink target {exc.message}") from None
        if not target:
            raise ImageRejected(f"{name}: hardlink to {member.linkname[:200]!r} outside the tree")
        check_tree_path(target, name)
        target_rel = "/".join(target)
        if target_rel.startswith(rel + "/"):
            raise ImageRejected(f"{name}: hardlink would replace the directory that holds its own target")
        with self._opened(target[:-1], None, create=False, member=f"{name} (hardlink target)") as holder:
            try:
                st = None if holder is None else os.stat(target[-1], dir_fd=holder, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if holder is None or st is None or not stat.S_ISREG(st.st_mode):
                raise ImageRejected(f"{name}: hardlink to {member.linkname[:200]!r}, "
                                    "which is not a file extracted before it")
            if target_rel == rel:
                return  # a link to itself: already there
            self._clear(parent, leaf, rel)
            os.link(target[-1], leaf, src_dir_fd=holder, dst_dir_fd=parent, follow_symlinks=False)
        if target_rel in self._digests:
            self._digests[rel] = self._digests[target_rel]

    # --- directories, reached only through descriptors

    @contextlib.contextmanager
    def _opened(self, parts: list[str], created: set[str] | None, *, create: bool = True,
                member: str = "") -> Iterator[int | None]:
        """A descriptor of the directory at `parts`, walked to from the root one component at a time
        with O_NOFOLLOW (made where missing, or None when create=False); closed afterwards.

        No descriptor outlives the operation it was opened for, so none can point into a
        directory that a later whiteout removed, nor be reused under another name.
        """
        fd = self._root
        try:
            for i, part in enumerate(parts):
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        yield None
                        return
                    os.mkdir(part, 0o755, dir_fd=fd)
                    if created is not None:
                        created.add("/".join(parts[:i + 1]))
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    where = f"{member}: {TREE_PREFIX}/{'/'.join(parts[:i + 1])}"
                    if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink
                        raise ImageRejected(f"{where} is a symlink, and a path may not pass through one") from None
                    if exc.errno == errno.ENOTDIR:
                        raise ImageRejected(f"{where} is not a directory, and the path goes through it") from None
                    raise
                if fd != self._root:
                    os.close(fd)
                fd = nxt
            yield fd
        finally:
            if fd != self._root:
                os.close(fd)

    def _clear(self, parent: int, leaf: str, rel: str) -> None:
        """Make room for a new entry at `leaf`: whatever is there goes, a directory with its contents."""
        try:
            st = os.stat(leaf, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        self._unlink_or_remove(parent, leaf, st)
        self._digests.pop(rel, None)

    @staticmethod
    def _unlink_or_remove(parent: int, leaf: str, st: os.stat_result) -> None:
        if stat.S_ISDIR(st.st_mode):
            fd = os.open(leaf, _DIR_FLAGS, dir_fd=parent)
            try:
                fs.empty_dir(fd)
            finally:
                os.close(fd)
            os.rmdir(leaf, dir_fd=parent)
        else:
            os.unlink(leaf, dir_fd=parent)

    def _remove(self, parent_parts: list[str], leaf: str, name: str) -> None:
        """A whiteout: delete `leaf` in the directory at `parent_parts`, if both exist."""
        with self._opened(parent_parts, None, create=False, member=name) as parent:
            if parent is not None:
                self._clear(parent, leaf, "/".join([*parent_parts, leaf]))

    def _clear_children(self, parts: list[str], created: set[str], name: str) -> None:
        """An opaque directory: hide what lower layers put in it, keep this layer's entries."""
        with self._opened(parts, None, create=False, member=name) as directory:
            if directory is None:
                return
            with os.scandir(directory) as it:
                names = [e.name for e in it]
            for leaf in names:
                if "/".join([*parts, leaf]) not in created:
                    self._clear(directory, leaf, "/".join([*parts, leaf]))

    # --- the result

    def finish(self) -> ExtractedTree:
        """Read the tree back: each regular file with its digest, every symlink checked to stay inside."""
        self.hashes.drain()
        files: dict[str, str] = {}
        links: dict[str, str] = {}
        dirs: set[str] = set()
        stack = [""]
        while stack:
            rel_dir = stack.pop()
            with os.scandir(self.path / rel_dir if rel_dir else self.path) as it:
                entries = list(it)
            for entry in entries:
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_symlink():
                    links[rel] = os.readlink(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    dirs.add(rel)
                    stack.append(rel)
                elif entry.is_file(follow_symlinks=False):
                    known = self._digests.get(rel)
                    files[rel] = "sha256:" + known.hexdigest() if known is not None else _hash_file(Path(entry.path))
                else:  # nothing else is ever created; a safety net for the invariant
                    raise ImageRejected(f"{TREE_PREFIX}/{rel}: unexpected file type in the staging tree")
        resolver = LinkResolver(links)
        for rel in links:
            resolver.resolve(rel, floor=0)
        return ExtractedTree(files, links, frozenset(dirs))


_KIND_NAMES = {"char": "device node", "block": "device node", "fifo": "FIFO"}


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def tree_parts(name: str) -> list[str] | None:
    """The components of a layer member's path below /nvidia-driver/, None if it lies elsewhere.

    Absolute names and `..` components are refused wherever they appear.
    """
    if name.startswith("/"):
        raise ImageRejected(f"{name[:200]!r}: absolute path in layer")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ImageRejected(f"{name[:200]!r}: '..' in layer path")
    if not parts or parts[0] != TREE_PREFIX:
        return None
    return parts[1:]


def check_tree_path(parts: list[str], name: str) -> None:
    """A path inside the tree: printable UTF-8, within the length and depth caps."""
    if len(parts) > MAX_DEPTH:
        raise ImageRejected(f"{name}: deeper than {MAX_DEPTH} directories")
    encoded = [p.encode("utf-8", "surrogateescape") for p in parts]
    if sum(len(p) + 1 for p in encoded) > MAX_PATH_BYTES:
        raise ImageRejected(f"{name}: path longer than {MAX_PATH_BYTES} bytes")
    for part, raw in zip(parts, encoded, strict=True):
        if len(raw) > MAX_COMPONENT_BYTES:
            raise ImageRejected(f"{name}: a name longer than {MAX_COMPONENT_BYTES} bytes")
        if not part.isprintable() or any(0xD800 <= ord(c) <= 0xDFFF for c in part):
            raise ImageRejected(f"{name}: not a printable UTF-8 name")


def check_symlink(rel: str, target: str, name: str) -> None:
    """A symlink must be relative and, read lexically, stay inside the tree."""
    if not target or target.startswith("/"):
        raise ImageRejected(f"{name}: absolute symlink -> {target[:200]!r}", hint="driver trees use relative symlinks")
    if "\0" in target or len(target.encode("utf-8", "surrogateescape")) > MAX_PATH_BYTES:
        raise ImageRejected(f"{name}: symlink target longer than {MAX_PATH_BYTES} bytes or holding NUL")
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
    if resolved == ".." or resolved.startswith("../"):
        raise ImageRejected(f"{name}: symlink -> {target[:200]!r} escapes the tree")


class LinkResolver:
    """Follows paths through a tree's symlinks, lexically, within a budget of steps for the whole tree
    (10,000 links of 512 components each, 40 hops apiece, would otherwise cost minutes)."""

    def __init__(self, links: dict[str, str], max_steps: int = MAX_LINK_STEPS) -> None:
        self.links = links
        self.steps_left = max_steps

    def resolve(self, rel: str, *, floor: int) -> str:
        """The path `rel` ends at. The walk may never climb above its first `floor` components (0: the
        tree root; 1 with a `lib64/...` path: lib64 itself, which is what the overlay on mount.target
        exposes)."""
        name = f"{TREE_PREFIX}/{rel}"
        base = rel.split("/")[:floor]
        todo = rel.split("/")[floor:]
        done = list(base)
        hops = 0
        while todo:
            self.steps_left -= 1
            if self.steps_left < 0:
                raise ImageRejected(f"{name}: the tree's symlinks take too long to resolve (too many, too deep)")
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if len(done) <= floor:
                    where = "the tree" if floor == 0 else "/".join(base)
                    raise ImageRejected(f"{name}: symlink -> {self.links.get(rel, '')[:200]!r} "
                                        f"resolves outside {where}")
                done.pop()
                continue
            candidate = "/".join([*done, part])
            target = self.links.get(candidate)
            if target is None:
                done.append(part)
                continue
            hops += 1
            if hops > MAX_LINK_HOPS or target.startswith("/"):
                raise ImageRejected(f"{name}: symlink chain loops or leaves the tree")
            todo = target.split("/") + todo
        return "/".join(done)
