"""The content store of layer blobs: named by digest, trusted only once their content was checked.

    <cache>/blobs/sha256/<hex>           a complete blob, verified when written
    <cache>/blobs/sha256/<hex>.partial   a download in progress; resumed with an HTTP Range request

A blob found on disk from an earlier run is hashed again before use: a file name proves
nothing about the bytes behind it. The store keeps only the blobs of the image being
installed; everything else (other images, rejected images, stray files) is collected.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import structlog

from agent.install import fs
from agent.reference import DIGEST_RE, Reference
from agent.registry import Descriptor

log = structlog.get_logger(__name__)
READ_BYTES = 1 << 20
PARTIAL = ".partial"


class BlobSource(Protocol):
    def fetch_blob(self, ref: Reference, desc: Descriptor, dest: Path, *,
                   cancelled: Callable[[], bool] = ...) -> None: ...


class BlobStore:
    """Layer blobs by digest under one directory, each verified before anything reads it."""

    def __init__(self, root: Path) -> None:
        self.root = root
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

    def _intact(self, path: Path, desc: Descriptor, cancelled: Callable[[], bool]) -> bool:
        if desc.digest in self._trusted and path.stat().st_size == desc.size:
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
        except OSError:
            size = -1
        if size == desc.size and f"sha256:{digest.hexdigest()}" == desc.digest:
            self._trusted.add(desc.digest)
            return True
        log.warning("cached_blob_corrupt", blob=desc.digest, path=str(path), detail="fetching it again")
        self.discard([desc.digest])
        return False

    def discard(self, digests: Iterable[str]) -> None:
        """Forget blobs (and their partial downloads): installed, or part of a rejected image."""
        for digest in digests:
            self._trusted.discard(digest)
            path = self.path(digest)
            for p in (path, path.with_name(path.name + PARTIAL)):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()

    def collect(self, keep: Iterable[str]) -> list[Path]:
        """Remove every file in the store that is not a blob (or partial download) in `keep`.

        Never raises: a store that cannot be cleaned only costs disk space; what could not be
        removed is logged with its path.
        """
        wanted = {self.path(d).name for d in keep}
        removed: list[Path] = []
        for directory in (self.root, self._dir):
            try:
                entries = list(directory.iterdir())
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("blob_cache_unreadable", path=str(directory), error=exc.strerror)
                continue
            for entry in entries:
                if entry == self._dir or entry.name.removesuffix(PARTIAL) in wanted:
                    continue
                error = fs.try_remove_tree(entry)
                if error is None:
                    removed.append(entry)
                else:
                    log.warning("blob_cache_not_cleaned", path=str(entry), error=error.strerror,
                                hint=f"remove it by hand: rm -rf {entry}")
        return removed
