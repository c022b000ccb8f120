"""The content store of layer blobs: named by digest, trusted only once their content was checked.

    <cache>/blobs/sha256/<hex>           a complete blob, verified when written
    <cache>/blobs/sha256/<hex>.partial   a download in progress; resumed with an HTTP Range request

A blob found on disk from an earlier run is hashed again before use: a file name proves
nothing about the bytes behind it. An installed image's blobs are dropped (the tree is the
cache from then on), a rejected image's too; what stays is an interrupted download (a stop, a
staging that yielded), kept for the next pass to resume while it is younger than
install.cache_max_age_s and the store within install.cache_max_mib (oldest goes first). A
pass that pulls nothing also drops complete blobs (left by a crash). Anything else in the
store (a name that is not a digest) is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from agent.errors import Cancelled, DigestMismatch, ImageMissing, ImageRejected
from agent.fetch.manifest import OCI_LAYER_TAR, Descriptor, check_blob, sha256_digest
from agent.install import fs
from agent.reference import DIGEST_RE, Reference

log = structlog.get_logger(__name__)
READ_BYTES = 1 << 20
PARTIAL = ".partial"


class BlobSource(Protocol):  # the registry client: it downloads (and resumes) a blob into the store
    def fetch_blob(self, ref: Reference, desc: Descriptor, dest: Path, *,
                   cancelled: Callable[[], bool] = ...) -> None: ...


BLOB_NAME_RE = re.compile(r"^[0-9a-f]{64}(\.partial)?\Z")


@dataclass(frozen=True)
class CachePolicy:
    max_bytes: int = 4096 << 20
    max_age_s: float = 7 * 86400.0


@dataclass(frozen=True)
class Entry:
    """One file of the store as collection sees it (`name` under sha256/, or a stray anywhere)."""

    name: str
    size: int
    mtime: float
    blob: bool  # a digest's blob or partial download, in sha256/


def to_collect(entries: Iterable[Entry], keep: set[str], now: float, policy: CachePolicy, *,
               idle: bool = False) -> set[str]:
    """The names to remove: strays; blobs older than max_age_s; when `idle` (no pull in flight),
    complete blobs too (an installed image's, left by a crash before they were dropped: only a
    cut-off download is worth keeping); then the oldest until the store, kept blobs included,
    fits max_bytes. A kept name (the image being pulled) never goes."""
    entries = list(entries)
    gone: set[str] = set()
    kept: list[Entry] = []
    for e in entries:
        if e.name.removesuffix(PARTIAL) in keep and e.blob:
            continue
        if not e.blob or now - e.mtime > policy.max_age_s or (idle and not e.name.endswith(PARTIAL)):
            gone.add(e.name)
        else:
            kept.append(e)
    total = sum(e.size for e in entries if e.blob and e.name not in gone)
    for e in sorted(kept, key=lambda e: e.mtime):
        if total <= policy.max_bytes:
            break
        gone.add(e.name)
        total -= e.size
    return gone


class BlobStore:
    """Layer blobs by digest under one directory, each verified before anything reads it."""

    def __init__(self, root: Path, policy: CachePolicy | None = None, clock: Callable[[], float] = time.time) -> None:
        self.root = root
        self.policy = policy or CachePolicy()
        self._clock = clock
        self._dir = root / "sha256"
        self._trusted: set[str] = set()  # digests this process wrote or checked

    def path(self, digest: str) -> Path:
        if not DIGEST_RE.match(digest):
            raise ValueError(f"not a sha256 digest: {digest!r}")
        return self._dir / digest.removeprefix("sha256:")

    def get(self, source: BlobSource, ref: Reference, desc: Descriptor,
            cancelled: Callable[[], bool] = lambda: False) -> Path:
        """The verified blob for `desc`: from the store if its content checks out, else downloaded."""
        path = self.path(desc.digest)
        if path.is_file() and self._intact(path, desc, cancelled):
            return path
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fs.os_error(exc, f"creating the blob cache {self._dir}") from exc
        source.fetch_blob(ref, desc, path, cancelled=cancelled)
        self._trusted.add(desc.digest)
        return path

    def _intact(self, path: Path, desc: Descriptor, cancelled: Callable[[], bool], *, trust: bool = True) -> bool:
        if trust and desc.digest in self._trusted and path.stat().st_size == desc.size:
            return True
        digest = hashlib.sha256()
        size = 0
        try:
            with path.open("rb") as f:
                while chunk := f.read(READ_BYTES):
                    if cancelled():
                        return False
                    digest.update(chunk)
                    size += len(chunk)
        except OSError as exc:  # a read that fails says nothing about the content: keep the blob
            raise fs.os_error(exc, f"reading the stored blob {path}") from exc
        try:
            check_blob(size, f"sha256:{digest.hexdigest()}", desc, f"stored blob {path}")
        except DigestMismatch as exc:
            log.warning("stored_blob_corrupt", blob=desc.digest, path=str(path), error=exc.message,
                        detail="removed; fetched or imported again")
            self.discard([desc.digest])
            return False
        self._trusted.add(desc.digest)
        return True

    def put(self, chunks: Iterable[bytes | memoryview], *, expect: Descriptor | None, what: str,
            cancelled: Callable[[], bool] = lambda: False) -> Descriptor:
        """Write a streamed blob into the store: hashed as it is written, then checked (check_blob)
        against `expect`, or named by its digest when the stream's own name proves nothing (a
        docker-archive's layer.tar). Nothing half-written ever carries a digest's name."""
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=".incoming-", dir=self._dir)
        except OSError as exc:
            raise fs.os_error(exc, f"writing into the blob store {self._dir}") from exc
        incoming = Path(name)
        try:
            digest, size = hashlib.sha256(), 0
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    if cancelled():
                        raise Cancelled(f"{what}: cancelled")
                    size += len(chunk)
                    if expect is not None and size > expect.size:
                        check_blob(size, "", expect, what)  # raises: more than its descriptor gives
                    digest.update(chunk)
                    out.write(chunk)
            got = f"sha256:{digest.hexdigest()}"
            desc = expect or Descriptor(OCI_LAYER_TAR, got, size)
            check_blob(size, got, desc, what)
            incoming.replace(self.path(desc.digest))
        except OSError as exc:
            incoming.unlink(missing_ok=True)
            raise fs.os_error(exc, f"{what}: writing {incoming}") from exc
        except BaseException:
            incoming.unlink(missing_ok=True)
            raise
        self._trusted.add(desc.digest)
        return desc

    def read(self, desc: Descriptor, limit: int, what: str) -> bytes:
        """A small blob's bytes (a manifest, a config), checked against `desc` every time it is read."""
        if desc.size > limit:
            raise ImageRejected(f"{what}: {desc.size} bytes, more than the {limit}-byte limit")
        try:
            with self.path(desc.digest).open("rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError:
            raise ImageMissing(f"{what}: blob {desc.digest} is not in {self._dir}",
                               hint="import the image again") from None
        except OSError as exc:
            raise fs.os_error(exc, f"{what}: reading {self.path(desc.digest)}") from exc
        check_blob(len(data), sha256_digest(data), desc, what)
        return data

    def verified(self, desc: Descriptor, what: str, cancelled: Callable[[], bool] = lambda: False) -> Path:
        """The path of a blob already in the store, re-hashed now (check_blob); ImageMissing if it is not."""
        path = self.path(desc.digest)
        if not path.is_file():
            raise ImageMissing(f"{what}: blob {desc.digest} is not in {self._dir}", hint="import the image again")
        if not self._intact(path, desc, cancelled, trust=False):
            if cancelled():
                raise Cancelled(f"{what}: cancelled")
            raise DigestMismatch(f"{what}: blob {desc.digest} in {self._dir} does not match its digest "
                                 "any more; it was removed", hint="import the image again")
        return path

    def discard(self, digests: Iterable[str]) -> None:
        """Forget blobs (and their partial downloads): installed, or part of a rejected image."""
        for digest in digests:
            self._trusted.discard(digest)
            path = self.path(digest)
            for p in (path, path.with_name(path.name + PARTIAL)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def present_bytes(self, digest: str) -> int:
        """How much of a blob is on disk already (the blob, or its partial download)."""
        path = self.path(digest)
        for p in (path, path.with_name(path.name + PARTIAL)):
            with contextlib.suppress(OSError):
                return p.lstat().st_size
        return 0

    def collect(self, keep: Iterable[str], *, idle: bool = False) -> list[Path]:
        """Remove what the policy says (to_collect); `keep`, the image being pulled, stays.

        Never raises: a store that cannot be cleaned only costs disk space; what could not be
        removed is logged with its path.
        """
        wanted = {self.path(d).name for d in keep}
        found: dict[str, tuple[Path, Entry]] = {}
        for directory in (self.root, self._dir):
            try:
                listing = list(directory.iterdir())
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("blob_cache_unreadable", path=str(directory), error=exc.strerror)
                continue
            for entry in listing:
                if entry == self._dir:
                    continue
                try:
                    st = entry.lstat()
                except OSError:
                    continue
                blob = directory == self._dir and stat.S_ISREG(st.st_mode) and bool(BLOB_NAME_RE.match(entry.name))
                key = entry.name if blob else f"/{entry.relative_to(self.root)}"  # strays never match a blob name
                found[key] = (entry, Entry(key, st.st_size, st.st_mtime, blob))
        gone = to_collect([e for _, e in found.values()], wanted, self._clock(), self.policy, idle=idle)
        removed: list[Path] = []
        for key in sorted(gone):
            entry = found[key][0]
            error = fs.try_remove_tree(entry)
            if error is None:
                removed.append(entry)
            else:
                log.warning("blob_cache_not_cleaned", path=str(entry), error=error.strerror,
                            hint=f"remove it by hand: rm -rf {entry}")
        return removed
