"""Install one image: layers from a source (agent.fetch.sources), extracted and verified in staging, moved in.

Nothing outside the staging directory changes before the final rename; the tree is on disk
(syncfs) before that rename makes it visible, and its marker is inside it, so a tree with a
marker is always complete. A failure, a stop or a crash leaves the previous tree where it was.
The layers are extracted while they download (agent.install.layers); nothing of them is used
before every blob was checked.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from agent import failpoints
from agent.errors import AgentError, DigestMismatch, ImageRejected
from agent.fetch.manifest import Platform, ResolvedImage, layer_diff_ids
from agent.fetch.sources import ImageSource
from agent.install import fs
from agent.install.layers import Layers, Unfollowable
from agent.install.trees import STAGING_PREFIX, move_into_place
from agent.install.unpack import MAX_STREAM_BYTES, ExtractedTree, Staging
from agent.install.verify import VerifiedTree, verify_tree
from agent.reference import Reference
from agent.state import TREE_MARKER, TreeMarker, marker_bytes

MAX_LAYERS = 64
log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class InstallResult:
    tree: Path
    image: ResolvedImage
    verified: VerifiedTree
    marker: TreeMarker


@dataclass(frozen=True)
class Want:
    """What the tree must be: the configured driver, for this host's OS key and running kernel."""

    driver: str
    os_key: str
    kernel: str
    lib64_allow: Sequence[str]


def install_image(
    source: ImageSource,
    ref: Reference,
    *,
    platform: Platform,
    install_root: Path,
    tree: Path,
    want: Want,
    on_phase: Callable[[str, dict[str, Any]], None],
    cancelled: Callable[[], bool] = lambda: False,
    refuse_digest: str | None = None,
    on_pull: Callable[[ResolvedImage], None] = lambda _image: None,
) -> InstallResult:
    """Resolve, fetch, verify and install `ref` at `tree` (a directory under `install_root`).

    `source` says where the bytes come from (agent.fetch.sources); every layer it hands out was
    checked against its descriptor, and is checked against the config's diff_ids here.
    `refuse_digest`: a digest the kernel refused before; resolving to it again raises
    Unchanged before anything is downloaded. `on_pull` hears of the image just before its layers
    are fetched (the daemon measures progress against it).
    """
    on_phase("resolving", {"reference": str(ref)})
    image = source.resolve(ref, platform)
    if refuse_digest is not None and image.reference.digest == refuse_digest:
        source.release(image)
        raise Unchanged(refuse_digest)
    if len(image.layers) > MAX_LAYERS:
        raise ImageRejected(f"{ref}: {len(image.layers)} layers; a driver image needs far fewer than {MAX_LAYERS}")
    diff_ids = layer_diff_ids(source.config(image), len(image.layers))
    layer_bytes = sum(d.size for d in image.layers)
    if layer_bytes > MAX_STREAM_BYTES:  # extraction would refuse it: do not download it first
        raise ImageRejected(f"{ref}: its layers claim {layer_bytes >> 20} MiB; a driver image is refused above "
                            f"{MAX_STREAM_BYTES >> 30} GiB")
    # The download, then the tree: unpacked, a layer is at least its compressed size.
    fs.check_space([*source.space(image), (install_root, layer_bytes, "the unpacked tree")])
    on_pull(image)  # what is about to be fetched: progress is measured against it
    on_phase("pulling", {"digest": image.reference.digest, "layers": len(image.layers), "bytes": layer_bytes,
                         **({"source": image.origin} if image.origin != "registry" else {})})
    try:
        with Layers(source, image, cancelled) as layers:
            verified, marker = _stage(layers, image, ref, tree=tree, install_root=install_root, want=want,
                                      on_phase=on_phase, diff_ids=diff_ids, cancelled=cancelled,
                                      release=lambda: source.release(image))
    except (ImageRejected, DigestMismatch):
        source.release(image)  # never kept: the next attempt fetches again
        raise
    return InstallResult(tree, image, verified, marker)


class Unchanged(Exception):  # a signal to the caller, not an error
    """The reference still resolves to a digest the caller asked to refuse."""

    def __init__(self, digest: str) -> None:
        super().__init__(digest)
        self.digest = digest


def _new_staging(tree: Path, install_root: Path) -> Path:
    try:
        install_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{tree.parent.name}-{tree.name}-", dir=install_root))
    except OSError as exc:
        raise fs.os_error(exc, f"creating a staging directory in {install_root}") from exc


def _extract(staging: Path, layers: Layers, diff_ids: tuple[str, ...], cancelled: Callable[[], bool], *,
             following: bool) -> ExtractedTree:
    """Every layer into `staging`, in order: followed as they download, or read from the verified blobs."""
    try:
        with Staging(staging) as unpacked:
            for i, (desc, diff_id) in enumerate(zip(layers.image.layers, diff_ids, strict=True)):
                with layers.follow(i) if following else layers.verified(i).open("rb") as stream:
                    unpacked.extract_layer(stream, desc.media_type, diff_id=diff_id, cancelled=cancelled,
                                           name=desc.digest.removeprefix("sha256:"),
                                           interrupt=functools.partial(layers.abandon, i))
                failpoints.hit("install.layer")
            return unpacked.finish()
    except OSError as exc:
        raise fs.os_error(exc, f"extracting into {staging}") from exc


def _extract_checked(tree: Path, install_root: Path, layers: Layers, diff_ids: tuple[str, ...],
                     cancelled: Callable[[], bool]) -> tuple[Path, ExtractedTree]:
    """The layers extracted while they download; again from the verified blobs when what was followed
    was not the blob, or was refused before its bytes were proven (a verdict counts only on checked bytes)."""
    staging = _new_staging(tree, install_root)
    doubt: Exception | None = None
    try:
        extracted = _extract(staging, layers, diff_ids, cancelled, following=True)
    except Unfollowable as exc:
        doubt = exc
    except (ImageRejected, DigestMismatch) as exc:
        if not layers.unproven:
            fs.try_remove_tree(staging)
            raise  # from bytes already checked: the image's own fault
        doubt = exc
    except BaseException:
        fs.try_remove_tree(staging)
        raise
    if doubt is None:
        try:
            layers.complete()  # every blob checked by its source before anything extracted from it is used
        except BaseException:
            fs.try_remove_tree(staging)
            raise
        return staging, extracted
    fs.try_remove_tree(staging)
    layers.complete()  # the download's own verdict first: a bad transfer is its error, not the image's
    log.info("layers_read_again", reason=str(doubt), detail="extracting from the verified blobs")
    staging = _new_staging(tree, install_root)
    try:
        return staging, _extract(staging, layers, diff_ids, cancelled, following=False)
    except BaseException:
        fs.try_remove_tree(staging)
        raise


def _release(release: Callable[[], None]) -> None:
    """Drop the blobs; a cache that cannot be cleaned is no reason to fail a verified install."""
    try:
        release()
    except (OSError, AgentError) as exc:
        log.warning("blobs_not_dropped", error=str(exc), detail="the content store's own cleanup removes them later")


def _stage(layers: Layers, image: ResolvedImage, ref: Reference, *, tree: Path, install_root: Path, want: Want,
           on_phase: Callable[[str, dict[str, Any]], None], diff_ids: tuple[str, ...],
           cancelled: Callable[[], bool], release: Callable[[], None]) -> tuple[VerifiedTree, TreeMarker]:
    """The checked tree in staging, its marker written, synced, renamed into place. `release` drops the blobs
    once the tree holds everything: before the sync, so their dirty pages are never written back (an install
    that fails after it fetches them again)."""
    staging, extracted = _extract_checked(tree, install_root, layers, diff_ids, cancelled)
    try:
        on_phase("verifying", {"digest": image.reference.digest})
        verified = verify_tree(staging, extracted, driver_version=want.driver, kernel=want.kernel,
                               lib64_allow=want.lib64_allow)
        failpoints.hit("install.verified")
        marker = TreeMarker(driver=want.driver, os_key=want.os_key, kernel=want.kernel, reference=str(ref),
                            digest=image.reference.digest or "", installed_at=time.time())
        (staging / TREE_MARKER).write_bytes(marker_bytes(marker))
        failpoints.hit("install.marker")
        on_phase("installing", {"tree": str(tree)})
        os.chmod(staging, 0o755)  # noqa: S103 - a driver tree is world-readable, like /usr
        _release(release)
        fs.syncfs(staging)  # the tree's data must be on disk before the rename makes it visible
        failpoints.hit("install.synced")
        move_into_place(staging, tree, install_root)
    except OSError as exc:
        raise fs.os_error(exc, f"installing {tree}") from exc
    finally:
        fs.try_remove_tree(staging)  # the failed attempt, or the old tree after an exchange
    return verified, marker
