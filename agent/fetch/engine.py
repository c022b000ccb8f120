"""The docker engine as a source (image.source = engine | auto), through the docker SDK.

The host's engine already knows the operator's mirrors, proxies and `docker login`: with
`engine` it pulls the image when it lacks it; with `auto` it is used only when its socket is
there and it has the image (`docker load`ed, or pulled before). Its layers are read from the
archive the engine exports (`docker save`'s format, streamed, never a container), each one
stored by its digest and checked against the config's rootfs.diff_ids (agent.fetch.archive);
they leave the content store once the install is done, like a registry's.

Also names the containers that keep /dev/nvidia* open when the modules are busy.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import IO, Any, cast

import requests
import structlog

from agent.errors import (
    AgentError,
    Cancelled,
    HostError,
    ImageMissing,
    ImageRejected,
    RegistryError,
    RegistryUnavailable,
)
from agent.fetch.archive import ArchiveReader, scan_tar
from agent.fetch.manifest import Descriptor, Platform, ResolvedImage
from agent.fetch.sources import Signature
from agent.fetch.store import BlobStore
from agent.install import fs
from agent.reference import Reference, normalize

log = structlog.get_logger(__name__)

ORIGIN = "engine"
EXPORT_CHUNK_BYTES = 1 << 20


class _ChunkReader(io.RawIOBase):
    """A file object over an iterator of byte chunks (the engine's export stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks: Iterator[bytes] = iter(chunks)
        self._buf = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while not self._buf:
            try:
                self._buf = next(self._chunks)
            except StopIteration:
                return b""
        n = len(self._buf) if size < 0 else size
        out, self._buf = self._buf[:n], self._buf[n:]
        return out


def _sdk() -> Any:
    """The docker SDK, imported only once an engine is there to ask (~60 ms: off an unchanged boot's path)."""
    import docker  # noqa: PLC0415
    import docker.errors  # noqa: PLC0415

    return docker


def attrs_size(attrs: dict[str, Any]) -> int:
    """The uncompressed size the engine reports for an image (its export is about that big)."""
    size = attrs.get("Size")
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 0


def _same_repository(named: str, ref: Reference) -> bool:
    """Whether a RepoDigests name (docker writes docker.io's short: `nvidia/driver`) is `ref`'s repository."""
    try:
        other = normalize(named)
    except ValueError:
        return False
    return (other.registry, other.repository) == (normalize(ref.name).registry, ref.repository)


def docker_name(ref: Reference) -> str:
    """How the engine names `ref` (registry/repository:tag)."""
    return f"{ref.name}:{ref.tag}" if ref.tag else ref.name


class EngineSource:
    """Images through the host's docker engine (module docstring)."""

    name = ORIGIN

    def __init__(self, socket: Path, cache: BlobStore, *, pull: bool, timeout_s: float = 60.0,
                 client: Callable[[str, float], Any] | None = None) -> None:
        self.socket = socket
        self.cache = cache
        self.pull = pull
        self.timeout_s = timeout_s
        self._make = client or (lambda url, timeout: _sdk().DockerClient(base_url=url, timeout=int(timeout)))
        self._exported: dict[str, list[str]] = {}  # engine image ID -> the blobs its export stored
        self._kept: dict[str, ResolvedImage] = {}  # engine image ID -> what its export resolved to

    def _client(self) -> Any:
        if not self.socket.exists():
            raise self._absent(f"no docker engine at {self.socket}")
        try:
            return self._make(f"unix://{self.socket.resolve()}", self.timeout_s)  # resolved: sockets take 107 bytes
        except _sdk().errors.DockerException as exc:
            raise self._absent(f"the docker engine at {self.socket} does not answer: {exc}") from exc

    def _absent(self, message: str) -> Exception:
        if self.pull:  # image.source = engine: the engine is the way images come here
            return RegistryUnavailable(message, hint="start the docker engine, or set image.source = auto")
        return ImageMissing(message)

    def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        try:
            return self._resolve(ref, platform)
        except (HostError, Cancelled):
            raise
        except AgentError as exc:
            if self.pull or isinstance(exc, ImageMissing):
                raise
            # auto: an engine that fails, or holds an image that is refused, is no reason not to pull
            log.warning("engine_skipped", image=docker_name(ref), error=exc.message)
            raise ImageMissing(f"the docker engine failed: {exc.message}") from exc

    def _resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        name = f"{ref.name}@{ref.digest}" if ref.digest else docker_name(ref)  # pinned: by digest, here too
        client = self._client()
        docker = _sdk()
        try:
            try:
                image = client.images.get(name)
            except docker.errors.ImageNotFound:
                if not self.pull:
                    raise ImageMissing(f"the docker engine has no image {name}") from None
                log.info("engine_pull", image=name)
                image = client.images.pull(name)
            return self._export(client, image, ref, platform)
        except docker.errors.ImageNotFound as exc:
            raise ImageMissing(f"the docker engine cannot pull {name}: {exc.explanation or exc}",
                               hint="check the image name and the engine's registry access (docker pull)") from exc
        except docker.errors.APIError as exc:
            raise RegistryError(f"the docker engine refused {name}: {exc.explanation or exc}") from exc
        except (docker.errors.DockerException, requests.RequestException) as exc:
            raise RegistryUnavailable(f"the docker engine at {self.socket}: {exc}") from exc
        finally:
            client.close()

    def _export(self, client: Any, image: Any, ref: Reference, platform: Platform) -> ResolvedImage:
        """The image as the engine exports it (`docker save`'s stream), read into the content store once per
        image ID while its blobs are there; what a refused export left is taken back."""
        what = f"the docker engine's image {docker_name(ref)} ({image.id[:19]})"
        attrs = image.attrs
        have = Platform(str(attrs.get("Os") or "linux"), str(attrs.get("Architecture") or ""),
                        attrs.get("Variant") or None)
        if have.architecture and not platform.matches(have):
            raise ImageRejected(f"{what}: built for {have}, not {platform}")
        chosen = self._kept.get(image.id)
        if chosen is None or not all(self.cache.path(d).is_file() for d in self._exported.get(image.id, [])):
            chosen = self._read_export(client, image, what, platform)
        # the engine's word (it is root on this host): the registry digest it pulled this image by
        pulled_by = next((digest for named, _, digest in (d.partition("@") for d in attrs.get("RepoDigests") or []
                                                            if isinstance(d, str))
                          if _same_repository(named, ref)), None)
        return replace(chosen, reference=ref.with_digest(chosen.reference.digest or ""), origin=ORIGIN,
                       index_digest=pulled_by or None)

    def _read_export(self, client: Any, image: Any, what: str, platform: Platform) -> ResolvedImage:
        size = attrs_size(image.attrs)
        fs.check_space([(self.cache.root, size, "the docker engine's export of the image")])
        written: list[str] = []
        try:
            stream = client.api.get_image(image.id, chunk_size=EXPORT_CHUNK_BYTES)
            scanned = scan_tar(cast(IO[bytes], _ChunkReader(stream)), self.cache, what, written=written,
                               budget=max(size * 2, 64 << 20))
            # the image ID is the config digest (the classic store) or the manifest's (the containerd store)
            images = ArchiveReader(scanned, self.cache, what).images(platform)
            found = [i for i in images if image.id in (i.config_digest, i.manifest.digest, i.image.index_digest)]
            if not found and len(images) == 1:
                found = images
            if not found:
                raise ImageRejected(f"{what}: the engine's export holds no image with its ID")
        except BaseException:
            self.cache.discard(written)
            raise
        chosen = found[0].image
        self._exported[image.id] = [*written, chosen.reference.digest or ""]
        self._kept[image.id] = chosen
        return chosen

    def config(self, image: ResolvedImage) -> dict[str, Any]:
        doc = json.loads(self.cache.read(image.config, 4 << 20, f"{image.reference}: config"))
        if not isinstance(doc, dict):
            raise ImageRejected(f"{image.reference}: the config is not a JSON object")
        return doc

    def space(self, image: ResolvedImage) -> list[tuple[Path, int, str]]:
        return []  # exported already (resolve): the layers are in the content store

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        return self.cache.verified(desc, f"{image.reference}: layer from the docker engine", cancelled)

    def landing(self, image: ResolvedImage, desc: Descriptor) -> Path | None:
        return None  # exported whole (resolve)

    def release(self, image: ResolvedImage) -> None:
        for image_id, kept in list(self._kept.items()):
            if kept.reference.digest == image.reference.digest:
                self._kept.pop(image_id)
                self.cache.discard(d for d in self._exported.pop(image_id, []) if d)

    def signature(self, image: ResolvedImage, digest: str) -> Signature | None:
        return None  # the engine keeps no signatures: they are looked for in the registry it pulled from

    def container_names(self, ids: Iterable[str]) -> dict[str, str]:
        """{container ID: name} for the IDs the engine knows; {} without an engine."""
        try:
            client = self._client()
        except (ImageMissing, RegistryUnavailable):
            return {}
        names: dict[str, str] = {}
        docker = _sdk()
        try:
            for cid in ids:
                try:
                    names[cid] = client.containers.get(cid).name
                except (docker.errors.DockerException, requests.RequestException):
                    continue
        finally:
            client.close()
        return names


def engine_for(source: str, socket: Path, cache: BlobStore, timeout_s: float) -> EngineSource | None:
    """The engine source image.source asks for: none for `registry`, pulling for `engine`."""
    if source == "registry":
        return None
    return EngineSource(socket, cache, pull=source == "engine", timeout_s=timeout_s)
