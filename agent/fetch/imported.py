"""Imported images: what `nvidia-agent import` brought in from an archive, kept for offline use.

    /var/lib/nvidia-agent/images/            an OCI image layout (skopeo, umoci and podman read it)
        oci-layout, index.json               one entry per image name (FULL_NAME: the whole reference)
        blobs/sha256/<hex>                   manifests, configs and layers, checked when written and
                                             hashed again each time they are read

Not a cache: an air-gapped host has no other copy, so nothing here ages out. An import that
replaces a name, or `nvidia-agent import --remove`, drops the blobs no entry uses any more.
Imports take a lock; index.json is replaced atomically after its blobs are on disk, so a reader
sees the old or the new set of images, each complete.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent.errors import ImageMissing, ImageRejected
from agent.fetch.archive import (
    FULL_NAME,
    REF_NAME,
    ArchiveImage,
    ArchiveReader,
    index_document,
    index_entries,
    scan_layout,
    scan_tar,
    space_for,
)
from agent.fetch.manifest import (
    CONFIG_MAX_BYTES,
    MANIFEST_MAX_BYTES,
    Descriptor,
    ManifestError,
    Platform,
    ResolvedImage,
    load_json_object,
    manifest_blobs,
    manifest_media_type,
    parse_image_manifest,
)
from agent.fetch.signature import PAYLOAD_MAX_BYTES, signature_tag
from agent.fetch.sources import Signature
from agent.fetch.store import BlobStore, CachePolicy
from agent.install import fs
from agent.reference import DIGEST_RE, Reference, normalize
from agent.state import write_atomic

log = structlog.get_logger(__name__)

FROM = "io.nvidia-agent.imported-from"
INDEX = "io.nvidia-agent.index-digest"  # the index the platform's manifest came from (pins and signatures name it)
AT = "io.nvidia-agent.imported-at"
ORIGIN = "imported"


@dataclass(frozen=True)
class Entry:
    name: str  # the whole reference, registry/repository:tag
    manifest: Descriptor
    source: str
    imported_at: float
    index_digest: str | None = None


def name_images(images: list[ArchiveImage], *, default: Reference | None, as_ref: Reference | None,
                what: str) -> list[tuple[Reference, ArchiveImage]]:
    """The name each image is kept under (pure). `as_ref` names the one image of the archive; else
    each name it carries: a whole reference (docker's short forms normalized), or a bare tag that
    belongs to `default`'s repository (what `skopeo copy ... oci-archive:FILE:TAG` writes)."""
    if as_ref is not None:
        if len(images) != 1:
            raise ImageRejected(f"{what}: --as names one image; the archive holds {len(images)}")
        return [(as_ref, images[0])]
    named: list[tuple[Reference, ArchiveImage]] = []
    for image in images:
        for text in image.names:
            ref = _name(text, default)
            if ref is not None and all(r != ref for r, _ in named):
                named.append((ref, image))
    if not named:
        raise ImageRejected(f"{what}: no image in it carries a name this agent can use",
                            hint="name it: nvidia-agent import --as REGISTRY/REPOSITORY:TAG PATH")
    return named


def _name(text: str, default: Reference | None) -> Reference | None:
    try:
        if "/" not in text and ":" not in text and "@" not in text:  # a bare tag: the configured repository's
            return Reference(default.registry, default.repository, tag=text) if default is not None else None
        ref = normalize(text)
    except ValueError:
        return None
    return Reference(ref.registry, ref.repository, tag=ref.tag) if ref.tag else None


class ImageStore:
    """The imported images (an OCI image layout), and the source that serves them (ORIGIN)."""

    name = ORIGIN

    def __init__(self, root: Path) -> None:
        self.root = root
        self.blobs = BlobStore(root / "blobs", CachePolicy(max_bytes=1 << 62, max_age_s=float("inf")))

    # --- reading ---

    def entries(self) -> list[Entry]:
        """The images kept, from index.json; none when nothing was imported."""
        try:
            raw = (self.root / "index.json").read_bytes()
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise fs.os_error(exc, f"reading {self.root / 'index.json'}") from exc
        try:
            out = []
            for desc, notes in index_entries(load_json_object(raw, "index.json")):
                name, source, at = notes.get(FULL_NAME), notes.get(FROM, "?"), notes.get(AT, "0")
                index = notes.get(INDEX)
                if isinstance(name, str):
                    out.append(Entry(name, desc, str(source), float(at) if str(at).replace(".", "").isdigit()
                                     else 0.0, index if isinstance(index, str) and DIGEST_RE.match(index) else None))
        except ManifestError as exc:
            raise ImageRejected(f"{self.root / 'index.json'}: {exc}",
                                hint=f"remove {self.root} and import the images again") from exc
        return out

    def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        """The imported image named `ref` (its tag; a pinned digest is checked by the caller)."""
        name = str(Reference(ref.registry, ref.repository, tag=ref.tag)) if ref.tag else None
        entry = next((e for e in self.entries() if e.name == name), None)
        if entry is None:
            raise ImageMissing(f"no imported image named {name or ref}",
                               hint=f"import one: nvidia-agent import --as {name or ref} ARCHIVE")
        what = f"imported image {entry.name}"
        body = self.blobs.read(entry.manifest, MANIFEST_MAX_BYTES, what)
        try:
            doc = load_json_object(body, f"manifest {entry.manifest.digest}")
            media_type = manifest_media_type(doc, entry.manifest.media_type)
            config, layers = parse_image_manifest(doc)
        except ManifestError as exc:
            raise ImageRejected(f"{what}: {exc}", hint=exc.hint) from exc
        return ResolvedImage(ref.with_digest(entry.manifest.digest), entry.index_digest, media_type, config, layers,
                             ORIGIN)

    def config(self, image: ResolvedImage) -> dict[str, Any]:
        body = self.blobs.read(image.config, CONFIG_MAX_BYTES, f"imported image {image.reference}: config")
        try:
            return load_json_object(body, "the image config")
        except ManifestError as exc:
            raise ImageRejected(f"imported image {image.reference}: {exc}") from exc

    def space(self, image: ResolvedImage) -> list[tuple[Path, int, str]]:
        return []  # its layers are on disk already

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        return self.blobs.verified(desc, f"imported image {image.reference}: layer", cancelled)

    def landing(self, image: ResolvedImage, desc: Descriptor) -> Path | None:
        return None  # on disk already

    def release(self, image: ResolvedImage) -> None:
        """Kept: an imported image is the host's offline copy."""

    def signature(self, image: ResolvedImage, digest: str) -> Signature | None:
        """An imported signature (`skopeo copy docker://REPO:sha256-<hex>.sig oci-archive:F:sha256-<hex>.sig`)."""
        name = f"{image.reference.name}:{signature_tag(digest)}"
        entry = next((e for e in self.entries() if e.name == name), None)
        if entry is None:
            return None
        what = f"imported signature {name}"
        try:
            doc = load_json_object(self.blobs.read(entry.manifest, MANIFEST_MAX_BYTES, what), what)
        except ManifestError as exc:
            raise ImageRejected(f"{what}: {exc}") from exc
        return doc, lambda desc: self.blobs.read(desc, PAYLOAD_MAX_BYTES, what)

    # --- importing ---

    def import_path(self, path: Path, platform: Platform, *, default: Reference | None, as_ref: Reference | None,
                    cancelled: Callable[[], bool] = lambda: False) -> list[tuple[Reference, ArchiveImage]]:
        """Import every image of the archive or layout at `path` for `platform`, under its names."""
        what = str(path)
        with self._locked():
            fs.check_space([(self.root, space_for(path), f"the images in {path}")])
            try:
                if path.is_dir():
                    scanned = scan_layout(path, self.blobs, what, cancelled)
                else:
                    try:
                        stream = path.open("rb")
                    except OSError as exc:
                        raise ImageRejected(f"cannot read {path}: {exc.strerror}") from None
                    with stream:
                        scanned = scan_tar(_maybe_gunzip(stream), self.blobs, what, cancelled)
                named = name_images(ArchiveReader(scanned, self.blobs, what).images(platform), default=default,
                                    as_ref=as_ref, what=what)
                fs.syncfs(self.root)  # the blobs are on disk before the index names them
                now = time.time()
                kept = {e.name: e for e in self.entries()}
                for ref, image in named:
                    kept[str(ref)] = Entry(str(ref), image.manifest, str(path.resolve()), now, image.image.index_digest)
                self._write_index(list(kept.values()))
            finally:
                self._collect()
        return named

    def remove(self, ref: Reference) -> bool:
        """Forget the image named `ref` and the blobs only it used; False if there was none."""
        with self._locked():
            entries = self.entries()
            kept = [e for e in entries if e.name != str(ref)]
            if len(kept) == len(entries):
                return False
            self._write_index(kept)
            self._collect()
        return True

    def _write_index(self, entries: list[Entry]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_atomic(self.root / "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        doc = index_document([(e.manifest, {FULL_NAME: e.name, REF_NAME: e.name.rsplit(":", 1)[-1],
                                            FROM: e.source, AT: f"{e.imported_at:.0f}",
                                            **({INDEX: e.index_digest} if e.index_digest else {})})
                              for e in sorted(entries, key=lambda e: e.name)])
        write_atomic(self.root / "index.json", doc)

    def _collect(self) -> None:
        """Remove the blobs no entry uses (a replaced image's, a failed import's)."""
        keep: set[str] = set()
        for e in self.entries():
            keep.add(e.manifest.digest)
            try:
                doc = json.loads(self.blobs.read(e.manifest, MANIFEST_MAX_BYTES, e.name))
                keep.update(d.digest for d in manifest_blobs(doc))
            except (ValueError, AttributeError, ManifestError, ImageRejected, ImageMissing) as exc:
                log.warning("imported_image_unreadable", image=e.name, error=str(exc))
        self.blobs.collect(keep=keep, idle=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise fs.os_error(exc, f"locking {self.root}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def _maybe_gunzip(stream: Any) -> Any:
    """An archive file as written, or gunzipped on the fly (`docker save | gzip` is common)."""
    import gzip  # noqa: PLC0415

    head = stream.peek(2)[:2] if hasattr(stream, "peek") else b""
    return gzip.GzipFile(fileobj=stream) if head == b"\x1f\x8b" else stream
