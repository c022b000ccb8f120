"""The content store: a blob is trusted for its content, never for its file name."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import HostError
from agent.fetch.manifest import Descriptor
from agent.fetch.store import BlobStore, CachePolicy, Entry, to_collect
from agent.install.fs import check_space, free_bytes
from agent.reference import Reference

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


def test_collect_keeps_the_image_being_pulled_and_young_downloads_and_removes_strays(tmp_path: Path) -> None:
    """The wanted blob and its partial download stay for the resume; another image's young download
    stays too (a staging that yielded resumes from it); old-layout names and strays are removed."""
    store = BlobStore(tmp_path / "blobs")
    keep, other = desc(b"keep"), desc(b"other")
    store.path(keep.digest).parent.mkdir(parents=True)
    for path in (store.path(keep.digest), store.path(keep.digest).with_suffix(".partial"),
                 store.path(other.digest).with_name(other.digest[7:] + ".partial"),
                 tmp_path / "blobs" / f"sha256-{other.digest[7:]}", tmp_path / "blobs/sha256/stray"):
        path.write_bytes(b"x")
    (tmp_path / "blobs/stray-dir/sub").mkdir(parents=True)
    (tmp_path / "blobs/sha256" / other.digest[7:]).symlink_to("/etc/passwd")  # a blob's name, not a blob
    removed = store.collect(keep=[keep.digest])
    assert sorted(p.name for p in (tmp_path / "blobs/sha256").iterdir()) == sorted(
        [keep.digest[7:], keep.digest[7:] + ".partial", other.digest[7:] + ".partial"])
    assert sorted(p.name for p in (tmp_path / "blobs").iterdir()) == ["sha256"]
    assert len(removed) == 4
    assert Path("/etc/passwd").exists()


def test_collect_by_age_then_oldest_first_by_size(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = BlobStore(tmp_path / "blobs", CachePolicy(max_bytes=250, max_age_s=3600), clock=lambda: now[0])
    store.path(desc(b"a").digest).parent.mkdir(parents=True)
    ages = {"old": 7200.0, "older_than_b": 600.0, "b": 300.0, "young": 10.0}
    paths = {}
    for name, age in ages.items():
        d = desc(name.encode())
        paths[name] = store.path(d.digest)
        paths[name].write_bytes(b"x" * 100)
        os.utime(paths[name], (now[0] - age, now[0] - age))
    store.collect(keep=())
    assert not paths["old"].exists(), "older than cache_max_age_s"
    assert not paths["older_than_b"].exists(), "300 bytes over a 250-byte budget: the oldest goes"
    assert paths["b"].exists() and paths["young"].exists()
    partial = paths["b"].with_name(paths["b"].name + ".partial")
    partial.write_bytes(b"x")
    store.collect(keep=(), idle=True)
    assert partial.exists() and not paths["b"].exists() and not paths["young"].exists(), \
        "nothing being pulled: a complete blob is a crash's leftover, a partial one a download to resume"


@given(entries=st.lists(st.tuples(st.sampled_from([f"{i:064x}" for i in range(6)] + ["stray", "x.partial"]),
                                  st.integers(0, 1000), st.floats(0, 10_000), st.booleans()),
                        max_size=12, unique_by=lambda e: e[0]),
       keep=st.sets(st.sampled_from([f"{i:064x}" for i in range(6)])),
       max_bytes=st.integers(0, 3000), max_age_s=st.floats(0, 10_000), idle=st.booleans())
def test_collection_never_takes_what_is_pulled_and_fits_the_budget(
        entries: list[tuple[str, int, float, bool]], keep: set[str], max_bytes: int, max_age_s: float,
        idle: bool) -> None:
    now = 10_000.0
    listed = [Entry(name, size, mtime, blob and name not in ("stray", "x.partial"))
              for name, size, mtime, blob in entries]
    gone = to_collect(listed, keep, now, CachePolicy(max_bytes, max_age_s), idle=idle)
    for e in listed:
        if e.blob and e.name in keep:
            assert e.name not in gone, "the image being pulled is never collected"
        elif not e.blob or now - e.mtime > max_age_s or idle:
            assert e.name in gone, "strays, old downloads and (idle) complete blobs always go"
    left = sum(e.size for e in listed if e.blob and e.name not in gone)
    kept_only = sum(e.size for e in listed if e.blob and e.name in keep)
    assert left <= max(max_bytes, kept_only), "over budget only by what is being pulled"
    others = sorted((e for e in listed if e.blob and e.name not in keep and e.name not in gone), key=lambda e: e.mtime)
    removed_young = [e for e in listed
                     if e.name in gone and e.blob and e.name not in keep and now - e.mtime <= max_age_s]
    if removed_young and others:
        assert max(e.mtime for e in removed_young) <= min(e.mtime for e in others), "the oldest go first"


def test_free_space_is_checked_per_filesystem_before_a_pull(tmp_path: Path) -> None:
    cache, root = tmp_path / "cache", tmp_path / "opt/nvidia"
    same = {cache: (1, 300 << 20, 10 << 30), root: (1, 300 << 20, 10 << 30)}
    check_space([(cache, 100 << 20, "the layers"), (root, 100 << 20, "the unpacked tree")], free=same.__getitem__)
    with pytest.raises(HostError,
                       match=r"the layers in .*cache \(150.0 MiB\) and the unpacked tree .*need 364.0 MiB") as err:
        check_space([(cache, 150 << 20, "the layers"), (root, 150 << 20, "the unpacked tree")], free=same.__getitem__)
    assert "300.0 MiB free" in err.value.message and err.value.hint and "keep_trees" in err.value.hint
    apart = {cache: (1, 300 << 20, 10 << 30), root: (2, 300 << 20, 10 << 30)}
    check_space([(cache, 150 << 20, "the layers"), (root, 150 << 20, "the unpacked tree")], free=apart.__getitem__)
    small = {root: (3, 2 << 20, 3 << 20)}  # a 3 MiB filesystem keeps a twentieth free, not 64 MiB
    check_space([(root, 1 << 20, "the unpacked tree")], free=small.__getitem__)
    with pytest.raises(HostError, match=r"with a 0\.1 MiB reserve"):
        check_space([(root, 2 << 20, "the unpacked tree")], free=small.__getitem__)


def test_free_bytes_looks_at_the_nearest_existing_parent(tmp_path: Path) -> None:
    device, free, size = free_bytes(tmp_path / "not/yet/there")
    assert device == os.stat(tmp_path).st_dev and 0 < free <= size


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
