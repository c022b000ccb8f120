"""Image manifests, indexes and configs (pure): media types, platforms, descriptors, and parsing that
trusts nothing it reads. Every source (registry, engine, archive, store) goes through these."""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import DigestMismatch, RegistryError
from agent.reference import DIGEST_RE, Reference

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
IMAGE_MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
# Every type we handle, always all four: a registry may answer 404 to an OCI manifest
# when Accept lists only the Docker types.
MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST))
SCHEMA1_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)

OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
LAYER_TYPES = frozenset({OCI_LAYER_TAR, OCI_LAYER_GZIP, DOCKER_LAYER_GZIP})
CONFIG_TYPES = frozenset({"application/vnd.oci.image.config.v1+json", "application/vnd.docker.container.image.v1+json"})

MANIFEST_MAX_BYTES = 4 * 1024 * 1024
CONFIG_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Platform:
    """An OCI platform: os, architecture and (for arm) variant."""

    os: str = "linux"
    architecture: str = "amd64"
    variant: str | None = None

    @classmethod
    def host(cls, machine: str | None = None) -> Platform:
        """The platform of this host, from `platform.machine()` (or `machine` in tests)."""
        name = (machine if machine is not None else _platform.machine()).lower()
        arch, variant = _MACHINES.get(name, (name, None))
        return cls("linux", arch, variant)

    def matches(self, other: Platform) -> bool:
        """Whether `other` (an index entry) serves this platform; a variant is compared only if we want one."""
        if (self.os, self.architecture) != (other.os, other.architecture):
            return False
        if self.variant is None:
            return True
        return _norm_variant(self.architecture, self.variant) == _norm_variant(other.architecture, other.variant)

    def __str__(self) -> str:
        text = f"{self.os}/{self.architecture}"
        return f"{text}/{self.variant}" if self.variant else text


_MACHINES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None),
    "amd64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i386": ("386", None),
    "i686": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def _norm_variant(arch: str, variant: str | None) -> str | None:
    """arm64 without a variant is v8 and arm without one is v7, as containerd normalizes."""
    if variant:
        return variant
    return {"arm64": "v8", "arm": "v7"}.get(arch)


@dataclass(frozen=True)
class Descriptor:
    """What names a blob or manifest: media type, sha256 digest and size in bytes."""

    media_type: str
    digest: str
    size: int


@dataclass(frozen=True)
class ResolvedImage:
    """A reference resolved to one single-platform manifest: its config and layers."""

    reference: Reference  # .digest is the chosen single-platform manifest's
    index_digest: str | None  # the index / manifest list the reference pointed at, if any
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    origin: str = "registry"  # the source that resolved it (agent.fetch.sources): where its blobs come from


class ManifestError(ValueError):
    """A manifest (or index) is malformed or asks for something unsupported."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint



def load_json_object(body: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object, or raise ManifestError naming `what`."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{what} is not valid JSON: {exc}") from exc
    except RecursionError:  # nesting no manifest has, and deeper than the parser goes
        raise ManifestError(f"{what} nests too deep to be a manifest") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{what} is not a JSON object")
    return doc


def manifest_media_type(doc: Mapping[str, Any], content_type: str) -> str:
    """The media type of a manifest document: from its body, else its Content-Type, else its shape."""
    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError("manifest mediaType is not a string")
    header = content_type.split(";", 1)[0].strip().lower()
    schema = doc.get("schemaVersion")
    if isinstance(schema, bool):
        raise ManifestError(f"manifest schemaVersion is {schema!r}, want 2")
    if schema == 1 or declared in SCHEMA1_TYPES or header in SCHEMA1_TYPES:
        raise ManifestError(
            "the image uses the Docker schema 1 manifest format, which is not supported",
            hint="push it again with a current tool (docker, skopeo, buildah) to get a schema 2 or OCI manifest",
        )
    if schema != 2 or not isinstance(schema, int):
        raise ManifestError(f"manifest schemaVersion is {schema!r}, want 2")
    kind = declared or header
    if kind in IMAGE_MANIFEST_TYPES or kind in INDEX_TYPES:
        return kind
    if kind and kind not in ("application/json", "application/octet-stream"):
        raise ManifestError(f"unsupported manifest media type {kind!r}")
    if "manifests" in doc:
        return OCI_INDEX
    if "config" in doc:
        return OCI_MANIFEST
    raise ManifestError("the document is neither an image manifest nor an index")


def parse_descriptor(obj: Any, where: str) -> Descriptor:
    """Validate one descriptor object of a manifest (hostile input: check every type)."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{where} is not an object")
    media_type, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{where} has no mediaType")
    if not isinstance(digest, str) or not DIGEST_RE.match(digest):
        raise ManifestError(f"{where} digest {digest!r} is not sha256:<64 hex>")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where} size {size!r} is not a byte count")
    return Descriptor(media_type, digest, size)


def parse_image_manifest(doc: Mapping[str, Any]) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """The config and layer descriptors of an image manifest; unsupported layer types are refused."""
    config = parse_descriptor(doc.get("config"), "config")
    if config.media_type not in CONFIG_TYPES:
        raise ManifestError(f"config media type {config.media_type!r} is not a container image config")
    raw_layers = doc.get("layers")
    if not isinstance(raw_layers, list):
        raise ManifestError("manifest layers is not a list")
    layers = tuple(parse_descriptor(item, f"layer {i}") for i, item in enumerate(raw_layers))
    for i, layer in enumerate(layers):
        check_layer_type(layer.media_type, i)
    return config, layers


def manifest_blobs(doc: Mapping[str, Any]) -> list[Descriptor]:
    """The config and layers a manifest names, whatever their media types (an image's or a signature's)."""
    layers = doc.get("layers")
    if not isinstance(layers, list):
        raise ManifestError("manifest layers is not a list")
    return [parse_descriptor(doc.get("config"), "config"),
            *(parse_descriptor(item, f"layer {i}") for i, item in enumerate(layers))]


def check_layer_type(media_type: str, index: int) -> None:
    """Refuse layer media types other than tar and tar+gzip, naming the type."""
    if media_type in LAYER_TYPES:
        return
    if "zstd" in media_type:
        why = "zstd layers are not supported yet; push the image with gzip layers"
    elif "nondistributable" in media_type or "foreign" in media_type:
        why = "non-distributable (foreign) layers are not supported; push the layer content itself"
    else:
        why = "want tar or tar+gzip layers"
    raise ManifestError(f"layer {index} has media type {media_type}: {why}")


def parse_index(doc: Mapping[str, Any]) -> list[tuple[Descriptor, Platform | None]]:
    """The entries of an index / manifest list with their platforms (None when unknown)."""
    raw = doc.get("manifests")
    if not isinstance(raw, list):
        raise ManifestError("index manifests is not a list")
    return [(parse_descriptor(item, f"index entry {i}"), _entry_platform(item)) for i, item in enumerate(raw)]


def _entry_platform(item: Mapping[str, Any]) -> Platform | None:
    spec = item.get("platform")
    if not isinstance(spec, dict):
        return None
    os_name, arch, variant = spec.get("os"), spec.get("architecture"), spec.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    if "unknown" in (os_name, arch):  # attestation manifests
        return None
    return Platform(os_name, arch, variant if isinstance(variant, str) and variant else None)


def select_manifest(entries: list[tuple[Descriptor, Platform | None]], want: Platform) -> Descriptor:
    """The first image manifest of an index that serves `want`; else a ManifestError listing what exists."""
    usable = [(desc, plat) for desc, plat in entries if plat is not None and desc.media_type in IMAGE_MANIFEST_TYPES]
    for desc, plat in usable:
        if want.matches(plat):
            return desc
    have = sorted({str(plat) for _, plat in usable})
    listing = ", ".join(have) if have else "no platforms at all"
    raise ManifestError(
        f"no {want} image in the index; it has {listing}",
        hint=f"push an image built for {want}",
    )


def config_platform(config: Mapping[str, Any]) -> Platform | None:
    """The platform an image config declares, None when it does not say."""
    os_name, arch, variant = config.get("os"), config.get("architecture"), config.get("variant")
    if not isinstance(os_name, str) or not isinstance(arch, str) or not os_name or not arch:
        return None
    return Platform(os_name, arch, variant if isinstance(variant, str) and variant else None)


def layer_diff_ids(config: Mapping[str, Any], layers: int) -> tuple[str, ...]:
    """The digests of the uncompressed layers (rootfs.diff_ids), one per layer of the manifest."""
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list) or not all(isinstance(d, str) and DIGEST_RE.match(d) for d in ids):
        raise RegistryError("the image config has no rootfs.diff_ids list of sha256 digests",
                            hint="push the image again with a current tool")
    if len(ids) != layers:
        raise RegistryError(f"the image config lists {len(ids)} layer diff_ids for a manifest of {layers} layers",
                            hint="the image is inconsistent; push it again")
    return tuple(ids)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()



TAMPERED_HINT = "the image is corrupt or was tampered with; it was not used"


def check_blob(size: int, digest: str, desc: Descriptor, what: str) -> None:
    """The one check every blob passes before anything reads it, whatever its source: its size and
    sha256 are the descriptor's. Raises DigestMismatch naming `what`."""
    if size != desc.size:
        raise DigestMismatch(f"{what}: got {size} bytes, the descriptor says {desc.size}", hint=TAMPERED_HINT)
    if digest != desc.digest:
        raise DigestMismatch(f"{what}: the content has digest {digest}", hint=TAMPERED_HINT)


GetManifest = Callable[[str, str], tuple[str, str, dict[str, Any]]]  # (selector, missing hint) -> digest, type, doc


def resolve_manifest(ref: Reference, platform: Platform, get: GetManifest, what: str, missing: str, *,
                     origin: str = "registry") -> ResolvedImage:
    """`ref` to the single-platform manifest for `platform`, following an index, with `get` fetching a
    manifest by tag or digest. The caller checks a single-platform manifest's config platform."""
    digest, media_type, doc = get(ref.selector, missing)
    index_digest = None
    if media_type in INDEX_TYPES:
        index_digest = digest
        try:
            chosen = select_manifest(parse_index(doc), platform)
        except ManifestError as exc:
            raise RegistryError(f"{what}: {exc}", hint=exc.hint) from exc
        digest, media_type, doc = get(chosen.digest, f"the index names manifest {chosen.digest}, which "
                                                     f"{ref.name} lacks; push the image again")
        if media_type not in IMAGE_MANIFEST_TYPES:
            raise RegistryError(f"{what}: index entry {chosen.digest} is a {media_type}, not an image manifest")
    try:
        config, layers = parse_image_manifest(doc)
    except ManifestError as exc:
        raise RegistryError(f"{what}: manifest {digest}: {exc}", hint=exc.hint) from exc
    return ResolvedImage(ref.with_digest(digest), index_digest, media_type, config, layers, origin)
