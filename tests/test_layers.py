"""Extraction while the layers download (agent/install/layers.py): what a follower reads counts only once checked."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.errors import Cancelled, ImageRejected, RegistryUnavailable
from agent.fetch.manifest import OCI_LAYER_TAR, Descriptor, Platform, ResolvedImage
from agent.fetch.registry import RegistryClient
from agent.fetch.sources import RegistrySource
from agent.fetch.store import PARTIAL, BlobStore
from agent.install.image import Want, install_image
from agent.install.layers import Layers, Unfollowable
from agent.reference import Reference
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, REPO, push_driver, tag

BLOB = bytes(range(256)) * 256  # 64 KiB
DESC = Descriptor(OCI_LAYER_TAR, "sha256:" + hashlib.sha256(BLOB).hexdigest(), len(BLOB))
IMAGE = ResolvedImage(Reference("r.example", "nvidia/driver", tag="t", digest="sha256:" + "0" * 64), None,
                      "application/vnd.oci.image.manifest.v1+json", Descriptor("c", "sha256:" + "1" * 64, 2), (DESC,),
                      "registry")


class Dribble:
    """A source that streams the blob into `<landing>.partial` a piece at a time, as the registry client does,
    doing what `script` says (a write is ("write", bytes), then "truncate", "replace" (a new file), "fail")."""

    name = "registry"

    def __init__(self, where: Path, script: list[Any], gap_s: float = 0.01) -> None:
        self.where, self.script, self.gap_s = where, script, gap_s
        self.finished_at = 0.0

    def landing(self, image: ResolvedImage, desc: Descriptor) -> Path:
        return self.where / desc.digest.removeprefix("sha256:")

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        final = self.where / desc.digest.removeprefix("sha256:")
        partial = final.with_name(final.name + PARTIAL)
        out = partial.open("wb")
        for step in self.script:
            time.sleep(self.gap_s)
            if cancelled():  # as the registry client does between chunks
                out.close()
                raise Cancelled("pull: cancelled")
            if step == "truncate":
                out.truncate(0)
                out.seek(0)
            elif step == "replace":
                out.close()
                partial.unlink()
                out = partial.open("wb")
            elif step == "fail":
                out.close()
                raise RegistryUnavailable("pull: the connection ended after 32768 bytes")
            else:
                out.write(step[1])
                out.flush()
        out.close()
        partial.replace(final)
        self.finished_at = time.monotonic()
        return final


def pieces(data: bytes, n: int) -> list[tuple[str, bytes]]:
    size = -(-len(data) // n)
    return [("write", data[i:i + size]) for i in range(0, len(data), size)]


def read_all(layers: Layers) -> tuple[bytes, float]:
    """What follow(0) yields, and when its first bytes came."""
    first = 0.0
    got = bytearray()
    with layers.follow(0) as stream:
        while chunk := stream.read(4096):
            first = first or time.monotonic()
            got += chunk
    return bytes(got), first


def test_a_follower_reads_the_blob_while_it_downloads(tmp_path: Path) -> None:
    source = Dribble(tmp_path, pieces(BLOB, 16), gap_s=0.02)
    with Layers(source, IMAGE, lambda: False) as layers:  # type: ignore[arg-type]
        got, first = read_all(layers)
        layers.complete()
        assert layers.verified(0) == tmp_path / DESC.digest.removeprefix("sha256:")
        assert not layers.unproven  # the follower checked what it read
    assert got == BLOB
    assert first < source.finished_at - 0.1  # it read while the download still ran


@pytest.mark.parametrize("script", [
    [*pieces(BLOB[:32768], 4), "truncate", *pieces(BLOB, 4)],  # a download that starts over
    [*pieces(bytes(len(BLOB)), 4), "replace", *pieces(BLOB, 4)],  # wrong bytes, refetched into a new file
], ids=["started-over", "refetched"])
def test_what_the_follower_read_is_not_believed_when_the_blob_was_written_twice(tmp_path: Path,
                                                                               script: list[Any]) -> None:
    with Layers(Dribble(tmp_path, script), IMAGE, lambda: False) as layers:  # type: ignore[arg-type]
        with pytest.raises(Unfollowable):
            read_all(layers)
        layers.complete()  # the download itself was fine: the install reads that instead
        assert layers.verified(0).read_bytes() == BLOB
        assert layers.unproven


def test_a_failed_download_is_the_followers_error(tmp_path: Path) -> None:
    with Layers(Dribble(tmp_path, [*pieces(BLOB[:32768], 2), "fail"]), IMAGE,  # type: ignore[arg-type]
                lambda: False) as layers:
        with pytest.raises(RegistryUnavailable, match="connection ended"):
            read_all(layers)
        with pytest.raises(RegistryUnavailable):
            layers.complete()


def test_a_stop_ends_a_follower_waiting_for_bytes(tmp_path: Path) -> None:
    stop = threading.Event()
    source = Dribble(tmp_path, pieces(BLOB, 64), gap_s=0.2)  # ~13 s
    started = time.monotonic()
    with Layers(source, IMAGE, stop.is_set) as layers:  # type: ignore[arg-type]
        threading.Timer(0.3, stop.set).start()
        with pytest.raises(Cancelled):  # the download's own stop, which ended the follower's wait
            read_all(layers)
    assert time.monotonic() - started < 5  # the follower and the download both stopped


def test_an_abandoned_follower_wakes_and_the_download_goes_on(tmp_path: Path) -> None:
    """The extraction failed on its own: its follower, waiting for bytes, is woken at once; the download is
    not stopped by it (the install wants its verdict)."""
    source = Dribble(tmp_path, pieces(BLOB, 8), gap_s=0.1)
    with Layers(source, IMAGE, lambda: False) as layers:  # type: ignore[arg-type]
        stream = layers.follow(0)
        assert stream.read(1)
        threading.Timer(0.2, layers.abandon, [0]).start()
        started = time.monotonic()
        with pytest.raises(Cancelled, match="abandoned"):
            while stream.read(4096):
                pass
        assert time.monotonic() - started < 0.6
        stream.close()
        layers.complete()
        assert layers.verified(0).read_bytes() == BLOB


class Whole(Dribble):
    """A source whose blobs appear only whole (as the engine's and imported ones do): nothing is followed."""

    def landing(self, image: ResolvedImage, desc: Descriptor) -> None:  # type: ignore[override]
        return None


def test_a_refusal_from_bytes_already_checked_is_final(tmp_path: Path) -> None:
    """Nothing was followed (the blob came whole, checked): a refused layer is refused at once, not extracted
    a second time."""
    from agent.install.image import _extract_checked  # noqa: PLC0415

    source = Whole(tmp_path, [("write", BLOB)], gap_s=0)
    layers = Layers(source, IMAGE, lambda: False)  # type: ignore[arg-type]
    with layers, capture_logs() as logs, pytest.raises(ImageRejected):
        _extract_checked(tmp_path / "tree", tmp_path / "root", layers, ("sha256:" + "2" * 64,), lambda: False)
    assert not [e for e in logs if e["event"] == "layers_read_again"]
    assert list((tmp_path / "root").iterdir()) == []  # its staging removed


def test_a_refusal_before_any_byte_was_read_is_final_and_does_not_wait_for_the_download(tmp_path: Path) -> None:
    """A layer refused before a byte of it was read (its media type) has nothing unproven behind the verdict:
    refused at once, not after the whole image downloaded, and not extracted again."""
    from agent.install.image import _extract_checked  # noqa: PLC0415

    odd = Descriptor("application/vnd.example.layer.v1.zstd", DESC.digest, DESC.size)
    image = ResolvedImage(IMAGE.reference, None, IMAGE.media_type, IMAGE.config, (odd,), "registry")
    layers = Layers(Dribble(tmp_path, pieces(BLOB, 64), gap_s=0.1), image, lambda: False)  # type: ignore[arg-type]
    started = time.monotonic()
    with layers, capture_logs() as logs, pytest.raises(ImageRejected, match="media type"):
        _extract_checked(tmp_path / "tree", tmp_path / "root", layers, ("sha256:" + "2" * 64,), lambda: False)
    assert time.monotonic() - started < 3  # the ~6 s download was stopped, not waited for
    assert not [e for e in logs if e["event"] == "layers_read_again"]


class GarbageFirst(RegistrySource):
    """The registry, behind a transfer that first lands the blob's size in wrong bytes (a flipped stream):
    the client's own check refetches it; the follower has read the garbage meanwhile."""

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        final = self.store.path(desc.digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        final.with_name(final.name + PARTIAL).write_bytes(b"\x1f\x8b" + bytes(desc.size - 2))
        time.sleep(0.3)  # the follower reads it
        return super().layer(image, desc, cancelled)


@pytest.mark.integration
@pytest.mark.subprocess
def test_an_install_that_followed_bad_bytes_extracts_again_from_the_verified_blob(
        tmp_path: Path, registry: RegistryServer) -> None:
    push_driver(tmp_path, registry.host, K1)
    source = GarbageFirst(RegistryClient(plain_http=[registry.host]), BlobStore(tmp_path / "cache"))
    root = tmp_path / "opt"
    with capture_logs() as logs:
        result = install_image(source, Reference(registry.host, REPO, tag(K1)), platform=Platform("linux", "amd64"),
                               install_root=root, tree=root / "tree", want=Want(DRIVER, f"ubuntu-22.04-{K1}", K1,
                                                                                ("lib*",)),
                               on_phase=lambda _n, _c: None)
    assert (root / "tree" / "manifest.json").is_file()
    assert result.verified.modules
    again = [e for e in logs if e["event"] == "layers_read_again"]
    assert len(again) == 1, logs  # the garbage refused by the inflater, or by the follower's own digest check
    assert [p.name for p in root.iterdir()] == ["tree"]  # no staging left behind
