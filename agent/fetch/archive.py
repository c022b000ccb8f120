"""Image archives: an OCI image layout (a directory), an oci-archive (a tar of one) and a
docker-archive (`docker save`, or what the docker engine exports).

An archive is read once, as a stream: every regular file in it goes into a blob store under the
digest of its own content (BlobStore.put), whatever the archive calls it; a member named
`blobs/sha256/<hex>` whose content has another digest is refused there and then. The images
are then read from those blobs the way a registry's are (manifest_media_type, parse_index,
parse_image_manifest, resolve_manifest), and a docker-archive's layers are checked against its
config's rootfs.diff_ids. A docker-archive has no manifest: one is written for it (an OCI
manifest of its config and uncompressed layers), so its config digest (docker's image ID) is
what names its content.
"""

from __future__ import annotations

import gzip
import json
import os
import posixpath
import stat
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from agent.errors import DigestMismatch, ImageRejected, RegistryError
from agent.fetch.manifest import (
    CONFIG_MAX_BYTES,
    IMAGE_MANIFEST_TYPES,
    INDEX_TYPES,
    MANIFEST_MAX_BYTES,
    OCI_INDEX,
    OCI_LAYER_TAR,
    OCI_MANIFEST,
    TAMPERED_HINT,
    Descriptor,
    ManifestError,
    Platform,
    ResolvedImage,
    check_blob,
    config_platform,
    layer_diff_ids,
    load_json_object,
    manifest_blobs,
    manifest_media_type,
    parse_descriptor,
    parse_index,
    resolve_manifest,
    sha256_digest,
)
from agent.fetch.signature import SIMPLE_SIGNING_TYPE
from agent.fetch.store import BlobStore
from agent.install import fs
from agent.install.tar import DIR, FILE, HARDLINK, SYMLINK, TarReader
from agent.reference import DIGEST_RE, Reference

OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
REF_NAME = "org.opencontainers.image.ref.name"  # OCI layout: a tag (or, from some tools, a whole name)
FULL_NAME = "io.containerd.image.name"  # docker >= 25 and containerd: the whole name
MAX_MEMBERS = 10_000
MAX_ARCHIVE_BYTES = 64 << 30
MAX_LINK_HOPS = 8
READ_BYTES = 1 << 20


class _OtherPlatform(Exception):
    def __init__(self, platform: str) -> None:
        super().__init__(platform)
        self.platform = platform


@dataclass(frozen=True)
class ArchiveImage:
    """One image found in an archive: the names it carries and its platform's manifest."""

    names: tuple[str, ...]  # as written: a tag, or a whole reference
    image: ResolvedImage  # reference: a placeholder name with the manifest's digest
    manifest: Descriptor
    config_digest: str


@dataclass
class Scanned:
    """What reading an archive found: its regular files by path, each stored under its digest."""

    kind: str  # "oci" or "docker"
    files: dict[str, Descriptor] = field(default_factory=dict)  # normalized path -> content
    links: dict[str, str] = field(default_factory=dict)  # normalized path -> the path it points at


def _norm(name: str) -> str | None:
    """An archive member's path, normalized; None for one that leaves the archive."""
    path = posixpath.normpath("/" + name.lstrip("/"))
    return path.lstrip("/") or None


def scan_tar(stream: IO[bytes], store: BlobStore, what: str, cancelled: Callable[[], bool] = lambda: False, *,
             budget: int = MAX_ARCHIVE_BYTES, written: list[str] | None = None) -> Scanned:
    """Read an oci-archive or docker-archive stream: every regular file into `store` by digest.

    At most `budget` bytes are written (checked as they stream, not only between members); each
    blob stored is appended to `written`, so a caller can take back what a refused archive left.
    A stream that is not a valid gzip or tar is ImageRejected, like anything else malformed.
    """
    try:
        return _scan_tar(stream, store, what, cancelled, budget=min(budget, MAX_ARCHIVE_BYTES), written=written)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ImageRejected(f"{what}: not a valid gzip stream: {exc}") from None


def _scan_tar(stream: IO[bytes], store: BlobStore, what: str, cancelled: Callable[[], bool], *, budget: int,
              written: list[str] | None) -> Scanned:
    scanned = Scanned(kind="")
    reader = TarReader(stream)
    count = 0
    stored = 0
    for member in reader:
        count += 1
        if count > MAX_MEMBERS:
            raise ImageRejected(f"{what}: more than {MAX_MEMBERS} entries; not an image archive")
        name = _norm(member.name)
        if name is None or member.kind == DIR:
            continue
        if member.kind in (SYMLINK, HARDLINK):  # docker save links repeated layers to the first copy
            base = posixpath.dirname(name) if member.kind == SYMLINK else ""
            target = _norm(posixpath.join(base, member.linkname)) if not member.linkname.startswith("/") else None
            if target is None:
                raise ImageRejected(f"{what}: {member.name!r} links outside the archive ({member.linkname!r})")
            scanned.links[name] = target
            continue
        if member.kind != FILE:
            raise ImageRejected(f"{what}: {member.name!r} is a {member.kind}; an image archive holds files")
        if stored + member.size > budget:
            raise ImageRejected(f"{what}: {name!r} takes it past {budget >> 20} MiB (what the disk, or "
                                f"{MAX_ARCHIVE_BYTES >> 30} GiB, allows); refused before writing it",
                                hint="make room, or check that this is the image archive you meant")
        desc = store.put(reader.data(), expect=_named(name, member.size), what=f"{what}: {name}",
                         cancelled=cancelled)
        stored += desc.size
        if written is not None:
            written.append(desc.digest)
        scanned.files[name] = desc
    scanned.kind = _kind(scanned, what)
    return scanned


def _named(name: str, size: int) -> Descriptor | None:
    """The descriptor a member's name claims (`blobs/sha256/<hex>`): its content must match it."""
    parts = name.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256" and DIGEST_RE.match(f"sha256:{parts[2]}"):
        return Descriptor(OCI_LAYER_TAR, f"sha256:{parts[2]}", size)
    return None


def _kind(scanned: Scanned, what: str) -> str:
    if "index.json" in scanned.files and "oci-layout" in scanned.files:
        return "oci"
    if "manifest.json" in scanned.files:
        return "docker"
    raise ImageRejected(f"{what}: neither an OCI image layout (oci-layout, index.json) nor a docker-archive "
                        "(manifest.json)", hint="make it with `skopeo copy ... oci-archive:FILE`, `docker save` "
                        "or `skopeo copy ... oci:DIR`")


def scan_layout(directory: Path, store: BlobStore, what: str,
                cancelled: Callable[[], bool] = lambda: False) -> Scanned:
    """Read an OCI image layout directory: its index and the blobs named by it into `store`.

    Only `oci-layout`, `index.json` and `blobs/sha256/<hex>` files are opened, never through
    a symbolic link; each blob's content must have the digest its name says.
    """
    scanned = Scanned(kind="oci")
    for name in ("oci-layout", "index.json"):
        scanned.files[name] = _put_file(directory, name, None, store, what=what, cancelled=cancelled)
    blobs = directory / "blobs" / "sha256"
    try:
        names = sorted(os.listdir(blobs))
    except OSError as exc:
        raise ImageRejected(f"{what}: cannot list {blobs}: {exc.strerror}") from None
    for hexname in names:
        if DIGEST_RE.match(f"sha256:{hexname}"):
            expect = Descriptor(OCI_LAYER_TAR, f"sha256:{hexname}", -1)
            rel = f"blobs/sha256/{hexname}"
            scanned.files[rel] = _put_file(directory, rel, expect, store, what=what, cancelled=cancelled)
    return scanned


def _put_file(directory: Path, rel: str, expect: Descriptor | None, store: BlobStore, *, what: str,
              cancelled: Callable[[], bool]) -> Descriptor:
    path = directory / rel
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not hang us
    except OSError as exc:
        raise ImageRejected(f"{what}: cannot open {rel}: {exc.strerror}",
                            hint="an OCI image layout holds oci-layout, index.json and blobs/sha256/") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ImageRejected(f"{what}: {rel} is not a regular file")
        os.set_blocking(f.fileno(), True)
        if expect is not None:
            expect = Descriptor(expect.media_type, expect.digest, st.st_size)
        return store.put(_chunks(f), expect=expect, what=f"{what}: {rel}", cancelled=cancelled)


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(READ_BYTES):
        yield chunk


# --- the images in what was scanned --------------------------------------------------------


class ArchiveReader:
    """The images of a scanned archive, read from the store and checked like a registry's."""

    def __init__(self, scanned: Scanned, store: BlobStore, what: str) -> None:
        self.scanned = scanned
        self.store = store
        self.what = what
        self._by_digest = {d.digest: d for d in scanned.files.values()}

    def images(self, platform: Platform) -> list[ArchiveImage]:
        """Every image for `platform` (images for others are left out); an archive with none is refused,
        naming what it has."""
        self._elsewhere: list[str] = []
        try:
            found = self._oci(platform) if self.scanned.kind == "oci" else self._docker(platform)
        except RegistryError as exc:  # the shared parsing speaks of registries; here it is the archive's fault
            raise ImageRejected(f"{self.what}: {exc.message}", hint="make the archive again") from exc
        if not found:
            if self._elsewhere:
                raise ImageRejected(f"{self.what}: no image for {platform} in it, only for "
                                    f"{', '.join(sorted(set(self._elsewhere)))}",
                                    hint=f"archive an image built for {platform}")
            raise ImageRejected(f"{self.what}: no image in it", hint="check what was archived")
        return found

    def _for_platform(self, read: Callable[[], ArchiveImage]) -> ArchiveImage | None:
        """The image `read` gives, or None (noted) when it is for another platform than this host's."""
        try:
            return read()
        except _OtherPlatform as exc:
            self._elsewhere.append(exc.platform)
            return None

    def _file(self, path: str, limit: int) -> bytes:
        for _ in range(MAX_LINK_HOPS):
            if path not in self.scanned.links:
                break
            path = self.scanned.links[path]
        desc = self.scanned.files.get(path)
        if desc is None:
            raise ImageRejected(f"{self.what}: it names {path!r}, which it does not hold")
        return self.store.read(desc, limit, f"{self.what}: {path}")

    def _blob(self, digest: str, limit: int) -> bytes:
        desc = self._by_digest.get(digest)
        if desc is None:
            raise ImageRejected(f"{self.what}: it names blob {digest}, which it does not hold",
                                hint="the archive is incomplete; make it again")
        return self.store.read(desc, limit, f"{self.what}: blob {digest}")

    def _get(self, selector: str, _missing: str) -> tuple[str, str, dict[str, Any]]:
        body = self._blob(selector, MANIFEST_MAX_BYTES)
        try:
            doc = load_json_object(body, f"manifest {selector}")
            return selector, manifest_media_type(doc, ""), doc
        except ManifestError as exc:
            raise ImageRejected(f"{self.what}: {exc}", hint=exc.hint) from exc

    def _oci(self, platform: Platform) -> list[ArchiveImage]:
        try:
            index = load_json_object(self._file("index.json", MANIFEST_MAX_BYTES), "index.json")
            found = []
            for desc, annotations in index_entries(index):
                if desc.media_type not in IMAGE_MANIFEST_TYPES | INDEX_TYPES:
                    continue  # signatures, attestations, other artifacts
                # the whole name where the archive gives one (docker >= 25, containerd); a bare ref.name tag
                # (skopeo's oci-archive:FILE:TAG) only without it, or a tag would name another repository
                full, tag = annotations.get(FULL_NAME), annotations.get(REF_NAME)
                names = (full,) if isinstance(full, str) and full else (tag,) if isinstance(tag, str) and tag else ()
                image = self._for_platform(partial(self._image, desc, names, platform))
                if image is not None:
                    found.append(image)
        except ManifestError as exc:
            raise ImageRejected(f"{self.what}: {exc}", hint=exc.hint) from exc
        return found

    def _image(self, desc: Descriptor, names: tuple[str, ...], platform: Platform) -> ArchiveImage:
        placeholder = Reference("archive.invalid", "image", digest=desc.digest)
        what = f"{self.what}: image {desc.digest}"
        body = self._blob(desc.digest, MANIFEST_MAX_BYTES)  # its size and digest are the index entry's
        if self._by_digest[desc.digest].size != desc.size:
            raise DigestMismatch(f"{what}: {self._by_digest[desc.digest].size} bytes, the index says {desc.size}",
                                 hint=TAMPERED_HINT)
        signed = self._signature(desc, body, names, placeholder)
        if signed is not None:
            return signed
        try:
            media_type = self._get(desc.digest, "")[1]
            if media_type in INDEX_TYPES:  # an index without this platform: the image is for others
                entries = parse_index(load_json_object(body, f"index {desc.digest}"))
                if not any(p is not None and platform.matches(p) for _, p in entries):
                    raise _OtherPlatform("/".join(sorted({str(p) for _, p in entries if p})) or "no platform")
            image = resolve_manifest(placeholder, platform, self._get, what, "the archive is incomplete",
                                     origin="archive")
        except ManifestError as exc:
            raise ImageRejected(f"{what}: {exc}", hint=exc.hint) from exc
        except RegistryError as exc:
            raise ImageRejected(exc.message, hint=exc.hint) from exc
        config = self._config(image)
        have = config_platform(config)
        if image.index_digest is None and have is not None and not platform.matches(have):
            raise _OtherPlatform(str(have))
        layer_diff_ids(config, len(image.layers))
        for n, layer in enumerate(image.layers):  # every layer in the archive, at its descriptor's size
            held = self._by_digest.get(layer.digest)
            if held is None:
                raise ImageRejected(f"{what}: layer {n} ({layer.digest}) is not in the archive",
                                    hint="the archive is incomplete; make it again")
            check_blob(held.size, held.digest, layer, f"{what}: layer {n}")
        manifest = self._by_digest[image.reference.digest or ""]
        return ArchiveImage(names, image, Descriptor(image.media_type, manifest.digest, manifest.size),
                            image.config.digest)

    def _signature(self, desc: Descriptor, body: bytes, names: tuple[str, ...],
                   placeholder: Reference) -> ArchiveImage | None:
        """A cosign signature manifest (every layer a simple-signing payload), its blobs all in the archive."""
        try:
            doc = load_json_object(body, f"manifest {desc.digest}")
            blobs = manifest_blobs(doc) if desc.media_type in IMAGE_MANIFEST_TYPES else []
        except ManifestError:
            return None
        if len(blobs) < 2 or any(b.media_type != SIMPLE_SIGNING_TYPE for b in blobs[1:]):
            return None
        for blob in blobs:
            self._blob(blob.digest, MANIFEST_MAX_BYTES)
        image = ResolvedImage(placeholder, None, desc.media_type, blobs[0], tuple(blobs[1:]), origin="archive")
        return ArchiveImage(names, image, desc, blobs[0].digest)  # kept like an image; read by its .sig name

    def _config(self, image: ResolvedImage) -> dict[str, Any]:
        body = self._blob(image.config.digest, CONFIG_MAX_BYTES)
        try:
            return load_json_object(body, "the image config")
        except ManifestError as exc:
            raise ImageRejected(f"{self.what}: {exc}") from exc

    def _docker(self, platform: Platform) -> list[ArchiveImage]:
        try:
            doc = json.loads(self._file("manifest.json", MANIFEST_MAX_BYTES))
        except (ValueError, RecursionError) as exc:
            raise ImageRejected(f"{self.what}: manifest.json is not JSON: {exc}") from None
        if not isinstance(doc, list):
            raise ImageRejected(f"{self.what}: manifest.json is not a list of images")
        found = [self._for_platform(partial(self._docker_image, i, entry, platform)) for i, entry in enumerate(doc)]
        return [image for image in found if image is not None]

    def _docker_image(self, i: int, entry: Any, platform: Platform) -> ArchiveImage:
        what = f"{self.what}: manifest.json entry {i}"
        if not isinstance(entry, dict):
            raise ImageRejected(f"{what} is not an object")
        config_path, layers, tags = entry.get("Config"), entry.get("Layers"), entry.get("RepoTags") or []
        if (not isinstance(config_path, str) or not isinstance(layers, list)
                or not all(isinstance(p, str) for p in layers) or not isinstance(tags, list)
                or not all(isinstance(t, str) for t in tags)):
            raise ImageRejected(f"{what}: want Config (a path), Layers (paths) and RepoTags (names)")
        config_bytes = self._file(_norm(config_path) or "", CONFIG_MAX_BYTES)
        try:
            config = load_json_object(config_bytes, "the image config")
        except ManifestError as exc:
            raise ImageRejected(f"{what}: {exc}") from exc
        have = config_platform(config)
        if have is not None and not platform.matches(have):
            raise _OtherPlatform(str(have))
        diff_ids = layer_diff_ids(config, len(layers))
        descs = []
        for n, (path, diff_id) in enumerate(zip(layers, diff_ids, strict=True)):
            target = _norm(path) or ""
            for _ in range(MAX_LINK_HOPS):
                target = self.scanned.links.get(target, target)
            stored = self.scanned.files.get(target)
            if stored is None:
                raise ImageRejected(f"{what}: layer {n} ({path!r}) is not in the archive")
            check_layer = Descriptor(OCI_LAYER_TAR, diff_id, stored.size)
            check_blob(stored.size, stored.digest, check_layer, f"{what}: layer {n} ({path}) against the config's "
                       "rootfs.diff_ids")
            descs.append(check_layer)
        config_desc = Descriptor(OCI_CONFIG, sha256_digest(config_bytes), len(config_bytes))
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_desc.digest, "size": config_desc.size},
            "layers": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size} for d in descs],
        }, sort_keys=True, separators=(",", ":")).encode()
        manifest_desc = self.store.put([manifest], expect=None, what=f"{what}: its manifest")
        manifest_desc = Descriptor(OCI_MANIFEST, manifest_desc.digest, manifest_desc.size)
        self._by_digest[config_desc.digest] = config_desc  # stored when scanned: a file of the archive
        self._by_digest[manifest_desc.digest] = manifest_desc
        image = ResolvedImage(Reference("archive.invalid", "image", digest=manifest_desc.digest), None,
                              OCI_MANIFEST, config_desc, tuple(descs), origin="archive")
        return ArchiveImage(tuple(tags), image, manifest_desc, config_desc.digest)


def index_entries(doc: Mapping[str, Any]) -> list[tuple[Descriptor, dict[str, Any]]]:
    """An OCI image layout's index.json read back: each entry's descriptor and annotations (ManifestError if
    malformed)."""
    items = doc.get("manifests")
    if not isinstance(items, list):
        raise ManifestError("index.json: manifests is not a list")
    return [(parse_descriptor(item, f"index.json entry {i}"),
             item["annotations"] if isinstance(item.get("annotations"), dict) else {})
            for i, item in enumerate(items)]


def index_document(entries: list[tuple[Descriptor, dict[str, str]]]) -> bytes:
    """An OCI image layout's index.json naming `entries` (descriptor, annotations)."""
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": d.media_type, "digest": d.digest, "size": d.size, "annotations": a}
                      for d, a in entries],
    }, indent=1, sort_keys=True).encode()


def space_for(path: Path) -> int:
    """What importing `path` may write: its size (a file) or the size of its blobs (a layout)."""
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in (path / "blobs" / "sha256").iterdir() if p.is_file())
        return path.stat().st_size
    except OSError as exc:
        raise fs.os_error(exc, f"reading {path}") from exc
