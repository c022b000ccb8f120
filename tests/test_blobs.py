"""The content store: a blob is trusted for its content, never for its file name."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from agent.blobs import BlobStore
from agent.reference import Reference
from agent.registry import Descriptor

REF = Reference("registry.example", "nvidia/driver", "t")
GZ = "application/vnd.oci.image.layer.v1.tar+gzip"


def desc(data: bytes) -> Descriptor:
    return Descriptor(GZ, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))


class Source:
    """Stands in for the registry client: writes the blob it is asked for, and counts the asks."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs
        self.fetched: list[str] = []

    def fetch_blob(self, ref: Reference, d: Descriptor, dest: Path, *,
                   cancelled: Callable[[], bool] = lambda: False) -> None:
        self.fetched.append(d.digest)
        dest.write_bytes(self.blobs[d.digest])


def test_a_blob_on_disk_is_hashed_before_it_is_used(tmp_path: Path) -> None:
    """A cached file with the right name but other bytes (a bad disk, a torn write) is thrown away and
    fetched again; a good one is used without the network, and hashed once per process."""
    good = b"layer bytes" * 1000
    d = desc(good)
    store = BlobStore(tmp_path / "blobs")
    store.path(d.digest).parent.mkdir(parents=True)
    store.path(d.digest).write_bytes(b"X" + good[1:])  # same size, one byte off
    source = Source({d.digest: good})
    assert store.get(source, REF, d).read_bytes() == good
    assert source.fetched == [d.digest]
    again = BlobStore(tmp_path / "blobs")  # the next agent process finds it on disk
    assert again.get(source, REF, d).read_bytes() == good
    assert source.fetched == [d.digest], "a verified blob on disk was fetched again"


def test_collect_keeps_only_the_image_being_installed(tmp_path: Path) -> None:
    """Blobs and partial downloads of other images, old-layout names and strays are removed; the
    wanted blob and its partial download stay for the resume."""
    store = BlobStore(tmp_path / "blobs")
    keep, other = desc(b"keep"), desc(b"other")
    store.path(keep.digest).parent.mkdir(parents=True)
    for path in (store.path(keep.digest), store.path(keep.digest).with_suffix(".partial"),
                 store.path(other.digest), store.path(other.digest).with_name(other.digest[7:] + ".partial"),
                 tmp_path / "blobs" / f"sha256-{other.digest[7:]}", tmp_path / "blobs/sha256/stray"):
        path.write_bytes(b"x")
    (tmp_path / "blobs/stray-dir/sub").mkdir(parents=True)
    removed = store.collect(keep=[keep.digest])
    assert sorted(p.name for p in (tmp_path / "blobs/sha256").iterdir()) == sorted(
        [keep.digest[7:], keep.digest[7:] + ".partial"])
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == ["sha256"]
    assert len(removed) == 5


def test_discard_forgets_a_rejected_image(tmp_path: Path) -> None:
    """The blobs of a refused image are deleted, so the next attempt downloads anew."""
    data = b"refused"
    d = desc(data)
    store = BlobStore(tmp_path / "blobs")
    source = Source({d.digest: data})
    path = store.get(source, REF, d)
    store.discard([d.digest])
    assert not path.exists()
    store.get(source, REF, d)
    assert source.fetched == [d.digest, d.digest]
