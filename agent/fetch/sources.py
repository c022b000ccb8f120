"""The seam between fetching and installing: where an image's bytes come from.

Every source answers the same five questions (ImageSource), so the install step never knows
whether a layer came from a registry, a mirror, the docker engine or an imported archive. Each
blob a source hands out is a local file that passed `check_blob` (its size and sha256 are its
descriptor's) when it was written, and imported ones again when read; the install step then
checks each layer's uncompressed digest against the config's diff_ids while it extracts.

`Sources` tries them in order: imported images (an operator put them there; no network), the
docker engine (image.source), the mirrors (image.mirrors), then the registry the reference
names. A source that lacks the image passes to the next; one that fails, serves an image other
than a pinned digest, or one without a good signature, is skipped with a warning (a mirror that
then fails to serve a layer is left out for AVOID_S); the origin's answer is final. Only the
host's own trouble (its disk, a stop) ends the search early.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import structlog

from agent.errors import AgentError, Cancelled, ConfigError, DigestMismatch, HostError, ImageMissing
from agent.fetch.manifest import Descriptor, Platform, ResolvedImage
from agent.fetch.registry import RegistryClient
from agent.fetch.signature import (
    PAYLOAD_MAX_BYTES,
    PublicKey,
    SignatureRefused,
    load_public_key,
    signature_tag,
    unsigned,
    verify,
)
from agent.fetch.store import BlobStore
from agent.reference import Reference

log = structlog.get_logger(__name__)
AVOID_S = 600.0  # a mirror that failed mid-install is not asked again for this long


Signature = tuple[dict[str, Any], Callable[[Descriptor], bytes]]  # the .sig manifest, a reader of its layers


@dataclass(frozen=True)
class Trust:
    """image.verify: the key every image must be signed by."""

    key: PublicKey
    path: str
    match_repository: bool = False


def load_trust(path: Path, shown: str, match_repository: bool) -> Trust:
    """The configured public key; ConfigError naming image.verify.public_key when it cannot be used."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise ConfigError(shown, "image.verify.public_key", f"cannot read: {exc.strerror}",
                          "a PEM public key such as cosign.pub") from None
    try:
        return Trust(load_public_key(pem, shown), shown, match_repository)
    except ConfigError as exc:
        named = ConfigError(shown, "image.verify.public_key", exc.message.removeprefix(f"{shown}: "))
        named.hint = exc.hint
        raise named from None


class ImageSource(Protocol):
    name: str

    def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        """`ref` to one single-platform image; ImageMissing when this source does not have it."""

    def config(self, image: ResolvedImage) -> dict[str, Any]:
        """The image's config, checked against its descriptor."""

    def space(self, image: ResolvedImage) -> list[tuple[Path, int, str]]:
        """What getting its layers will write: (directory, bytes, what) for fs.check_space."""

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        """A local file holding the layer, checked (check_blob) before it is handed out."""

    def landing(self, image: ResolvedImage, desc: Descriptor) -> Path | None:
        """Where `layer` will hand the blob out, when it streams it to `<that path>.partial` first: a reader
        may follow the download there (and must check what it read itself). None: it appears only whole."""

    def release(self, image: ResolvedImage) -> None:
        """The install is over (done or refused): drop what was fetched only for it."""

    def signature(self, image: ResolvedImage, digest: str) -> Signature | None:
        """The cosign signature manifest of `digest` this source holds (and a reader of its payloads), or None."""


class RegistrySource:
    """A registry (the reference's own, or a mirror of it) through the content store."""

    def __init__(self, client: RegistryClient, store: BlobStore, *, mirror: str | None = None) -> None:
        self.client = client
        self.store = store
        self.mirror = mirror
        self.name = f"mirror {mirror}" if mirror else "registry"

    def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        where = replace(ref, registry=self.mirror) if self.mirror else ref
        return replace(self.client.resolve(where, platform), origin=self.name)

    def config(self, image: ResolvedImage) -> dict[str, Any]:
        return self.client.fetch_config(image.reference, image.config)

    def space(self, image: ResolvedImage) -> list[tuple[Path, int, str]]:
        digests = [d.digest for d in image.layers]
        self.store.collect(keep=digests)  # strays, old downloads, what is over the cache's budget
        missing = sum(d.size for d in image.layers) - sum(self.store.present_bytes(d) for d in digests)
        return [(self.store.root, missing, "the layers")]

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        return self.store.get(self.client, image.reference, desc, cancelled)

    def landing(self, image: ResolvedImage, desc: Descriptor) -> Path | None:
        return self.store.path(desc.digest)

    def release(self, image: ResolvedImage) -> None:
        self.store.discard(d.digest for d in image.layers)  # the installed tree is the cache from now on

    def signature(self, image: ResolvedImage, digest: str) -> Signature | None:
        ref = Reference(image.reference.registry, image.reference.repository, tag=signature_tag(digest))
        what = f"signature of {image.reference.name}@{digest}"
        try:
            _, _, doc = self.client.manifest(ref, what)
        except ImageMissing:
            return None
        return doc, lambda desc: self.client.fetch_small(ref, desc, PAYLOAD_MAX_BYTES, what)


@dataclass(frozen=True)
class Pinned:
    """`ref` must resolve to this digest: its index, its manifest or (for an archive or the engine,
    which keep no manifest of the registry's) its config, docker's image ID."""

    digest: str

    def admits(self, image: ResolvedImage) -> bool:
        return self.digest in (image.index_digest, image.reference.digest, image.config.digest)


class Sources:
    """The sources in the order they are asked (module docstring); dispatches by ResolvedImage.origin."""

    def __init__(self, sources: Sequence[ImageSource], trust: Trust | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sources = list(sources)
        self.trust = trust
        self._by_name = {s.name: s for s in self.sources}
        self.name = "sources"
        self._clock = clock
        self._avoid: dict[str, float] = {}  # mirror -> until when it is not asked (it failed mid-install)

    def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        pin = Pinned(ref.digest) if ref.digest else None
        last = len(self.sources) - 1
        missing: ImageMissing | None = None
        for i, source in enumerate(self.sources):
            final = i == last
            avoided = self._avoid.get(source.name, 0.0) - self._clock()
            if not final and avoided > 0:
                log.info("source_avoided", source=source.name, image=str(ref), for_s=round(avoided))
                continue
            image: ResolvedImage | None = None
            try:
                image = source.resolve(ref, platform)
                if pin is not None and not pin.admits(image):
                    raise DigestMismatch(f"{ref}: {source.name} has {image.reference.digest}, not the pinned "
                                         f"{pin.digest}", hint="image.pins says which image this host accepts")
                if self.trust is not None:
                    self._check_signature(self.trust, source, image, ref)
            except (HostError, Cancelled):
                raise  # this host's own trouble: another source would meet it too
            except AgentError as exc:
                if image is not None:
                    source.release(image)  # what it fetched to answer (an engine's export) goes
                if final:
                    raise
                if isinstance(exc, ImageMissing) and not source.name.startswith("mirror "):
                    missing = missing or exc  # imported or engine: not there is no news
                else:  # a mirror that fails, lies or is unsigned, an imported or engine image that is refused
                    log.warning("mirror_skipped" if source.name.startswith("mirror ") else "source_skipped",
                                source=source.name, image=str(ref), error=exc.message)
                continue
            if source.name != "registry":
                log.info("image_source", source=source.name, image=str(ref), digest=image.reference.digest)
            return image
        raise missing or ImageMissing(f"no source has {ref}")

    def _check_signature(self, trust: Trust, source: ImageSource, image: ResolvedImage, ref: Reference) -> None:
        """A signature by the trusted key for the image's index or manifest digest, looked for in the source
        that resolved it, the imported images, then the origin registry (the last two under the name `ref`
        gives, whatever mirror served the image); SignatureRefused if none verifies."""
        as_named = replace(image, reference=ref.with_digest(image.reference.digest or ""))
        places = [(source, image)]
        places += [(s, as_named) for s in self.sources if s.name == "imported" and s is not source]
        if self.sources[-1] is not source:
            places.append((self.sources[-1], as_named))
        digests = [d for d in (image.index_digest, image.reference.digest) if d]
        refused: list[SignatureRefused] = []
        unreachable: list[str] = []
        for digest in digests:
            for place, seen_as in places:
                try:
                    found = place.signature(seen_as, digest)
                except AgentError as exc:
                    unreachable.append(f"{place.name}: {exc.message}")
                    continue
                if found is None:
                    continue
                doc, read = found
                try:
                    verify(trust.key, digest, seen_as.reference.name, doc, read,
                           match_repository=trust.match_repository)
                except SignatureRefused as exc:
                    refused.append(exc)  # another place may still hold a good one
                    continue
                log.info("signature_verified", image=seen_as.reference.name, digest=digest, key=trust.path,
                         where=place.name)
                return
        if refused:
            raise refused[0]
        error = unsigned(image.reference.name, digests[-1])
        if unreachable:
            error = SignatureRefused(f"{error.message} (not every place could be asked: {unreachable[0]})",
                                     hint=error.hint)
        raise error

    def avoid(self, image: ResolvedImage, error: AgentError) -> None:
        """A mirror that resolved an image and then failed to serve it is left out for AVOID_S."""
        if image.origin.startswith("mirror ") and not isinstance(error, (HostError, Cancelled)):
            self._avoid[image.origin] = self._clock() + AVOID_S
            log.warning("mirror_avoided", mirror=image.origin.removeprefix("mirror "), for_s=AVOID_S,
                        error=error.message)

    def _of(self, image: ResolvedImage) -> ImageSource:
        try:
            return self._by_name[image.origin]
        except KeyError:
            raise AgentError(f"{image.reference}: resolved by {image.origin!r}, which is not a source here") from None

    def config(self, image: ResolvedImage) -> dict[str, Any]:
        return self._of(image).config(image)

    def space(self, image: ResolvedImage) -> list[tuple[Path, int, str]]:
        return self._of(image).space(image)

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        try:
            return self._of(image).layer(image, desc, cancelled)
        except AgentError as exc:
            self.avoid(image, exc)
            raise

    def landing(self, image: ResolvedImage, desc: Descriptor) -> Path | None:
        return self._of(image).landing(image, desc)

    def release(self, image: ResolvedImage) -> None:
        self._of(image).release(image)

    def signature(self, image: ResolvedImage, digest: str) -> Signature | None:
        return self._of(image).signature(image, digest)


def sources_for(client: RegistryClient, cache: BlobStore, *, mirrors: Sequence[str] = (),
                imported: ImageSource | None = None, engine: ImageSource | None = None,
                trust: Trust | None = None) -> Sources:
    """The chain the configuration describes: imported, engine, mirrors in order, the origin."""
    chain: list[ImageSource] = [s for s in (imported, engine) if s is not None]
    chain += [RegistrySource(client, cache, mirror=m) for m in mirrors]
    chain.append(RegistrySource(client, cache))
    return Sources(chain, trust)
