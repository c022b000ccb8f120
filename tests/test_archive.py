"""Image archives as hostile input (agent/fetch/archive.py): generated oci-archives and docker-archives,
well-formed and then damaged (members dropped, renamed, linked out, their bytes flipped, their JSON
replaced by anything), are either read into images whose every blob checks out, or refused with an
ImageRejected / DigestMismatch; nothing is ever written outside the store."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import DigestMismatch, ImageRejected
from agent.fetch.archive import ArchiveReader, scan_layout, scan_tar
from agent.fetch.imported import ImageStore
from agent.fetch.manifest import Platform
from agent.fetch.store import BlobStore

AMD64 = Platform("linux", "amd64")
SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def layer_tar(files: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@dataclass
class Member:
    name: str
    data: bytes = b""
    kind: bytes = tarfile.REGTYPE
    link: str = ""


def render(members: list[Member]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for m in members:
            info = tarfile.TarInfo(m.name)
            info.type = m.kind
            info.linkname = m.link
            info.size = len(m.data) if m.kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(m.data) if m.kind == tarfile.REGTYPE else None)
    return out.getvalue()


def config_for(layers: list[bytes]) -> bytes:
    return json.dumps({"architecture": "amd64", "os": "linux",
                       "rootfs": {"type": "layers", "diff_ids": [digest(layer) for layer in layers]}}).encode()


def docker_archive(layers: list[bytes], tag: str = "reg.example/nvidia/driver:1") -> list[Member]:
    config = config_for(layers)
    members = [Member(f"{i:02d}{'ab' * 31}/layer.tar", layer) for i, layer in enumerate(layers)]
    members.append(Member(f"{digest(config)[7:]}.json", config))
    members.append(Member("manifest.json", json.dumps([{"Config": f"{digest(config)[7:]}.json", "RepoTags": [tag],
                                                        "Layers": [m.name for m in members[:-1]]}]).encode()))
    return members


def oci_archive(layers: list[bytes], tag: str = "1") -> list[Member]:
    config = config_for(layers)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      "digest": digest(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest(layer),
                                       "size": len(layer)} for layer in layers]}).encode()
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(manifest),
         "size": len(manifest), "annotations": {"org.opencontainers.image.ref.name": tag}}]}).encode()
    blobs = [Member(f"blobs/sha256/{digest(b)[7:]}", b) for b in (*layers, config, manifest)]
    return [Member("oci-layout", b'{"imageLayoutVersion":"1.0.0"}'), Member("index.json", index), *blobs]


def read(tmp_path: Path, data: bytes) -> tuple[BlobStore, list[Any]]:
    store = BlobStore(tmp_path / "store")
    scanned = scan_tar(io.BytesIO(data), store, "test archive")
    return store, ArchiveReader(scanned, store, "test archive").images(AMD64)


LAYERS = [layer_tar({"nvidia-driver/manifest.json": b"{}"}),
          layer_tar({"nvidia-driver/lib64/libcuda.so.1": b"x" * 700})]


@pytest.mark.parametrize("make", [docker_archive, oci_archive])
def test_well_formed_archives_are_read(tmp_path: Path, make: Any) -> None:
    store, images = read(tmp_path, render(make(LAYERS)))
    [image] = images
    assert [d.digest for d in image.image.layers] == [digest(layer) for layer in LAYERS]
    for desc in image.image.layers:
        assert store.verified(desc, "test").read_bytes() in LAYERS


def test_a_flipped_byte_in_a_docker_layer_is_caught_by_the_diff_ids(tmp_path: Path) -> None:
    members = docker_archive(LAYERS)
    members[1].data = members[1].data[:600] + bytes([members[1].data[600] ^ 1]) + members[1].data[601:]
    with pytest.raises(DigestMismatch, match=r"rootfs\.diff_ids"):
        read(tmp_path, render(members))


def test_a_blob_whose_content_is_not_its_name_is_refused_at_once(tmp_path: Path) -> None:
    members = oci_archive(LAYERS)
    members[2].data = members[2].data[:-1] + b"\x01"
    with pytest.raises(DigestMismatch, match="the content has digest"):
        read(tmp_path, render(members))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                         max_size=4), max_leaves=12)
names = st.one_of(st.sampled_from(["manifest.json", "index.json", "oci-layout", "../escape", "/abs/path",
                                   "blobs/sha256/" + "0" * 64, "a/../../b", "./manifest.json"]),
                  st.text(alphabet="abc./-_", min_size=1, max_size=30))


@st.composite
def damaged(draw: st.DrawFn) -> list[Member]:
    members = draw(st.sampled_from([docker_archive, oci_archive]))(LAYERS)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(members) - 1))
        action = draw(st.sampled_from(["drop", "rename", "flip", "json", "link", "hardlink", "special", "dup"]))
        m = members[i]
        if action == "drop" and len(members) > 1:
            members.pop(i)
        elif action == "rename":
            m.name = draw(names)
        elif action == "flip" and m.data:
            at = draw(st.integers(0, len(m.data) - 1))
            m.data = m.data[:at] + bytes([m.data[at] ^ draw(st.integers(1, 255))]) + m.data[at + 1:]
        elif action == "json":
            m.data = json.dumps(draw(json_values)).encode()
        elif action in ("link", "hardlink"):
            members[i] = Member(m.name, kind=tarfile.SYMTYPE if action == "link" else tarfile.LNKTYPE,
                                link=draw(names))
        elif action == "special":
            kinds = [tarfile.FIFOTYPE, tarfile.CHRTYPE, tarfile.DIRTYPE]
            members[i] = Member(m.name, kind=draw(st.sampled_from(kinds)))
        elif action == "dup":
            members.insert(i, Member(m.name, draw(st.binary(max_size=64))))
    return members


@SETTINGS
@given(members=damaged())
def test_damaged_archives_are_read_consistently_or_refused(tmp_path_factory: pytest.TempPathFactory,
                                                           members: list[Member]) -> None:
    tmp = tmp_path_factory.mktemp("archive")
    try:
        store, images = read(tmp, render(members))
    except (ImageRejected, DigestMismatch):
        images = []
        store = BlobStore(tmp / "store")
    for found in images:  # whatever was accepted checks out, blob by blob, against what it claims
        for desc in found.image.layers:
            assert digest(store.verified(desc, "test").read_bytes()) == desc.digest
        assert found.image.config.digest == found.config_digest
    outside = [p for p in tmp.rglob("*") if not str(p).startswith(str(tmp / "store"))]
    assert outside == [], "nothing is written outside the store"


def test_a_bare_tag_names_the_image_only_when_the_archive_gives_no_whole_name(tmp_path: Path) -> None:
    """docker >= 25 and containerd write both; the tag alone would file another repository's image under ours."""
    members = oci_archive(LAYERS)
    index = json.loads(members[1].data)
    index["manifests"][0]["annotations"]["io.containerd.image.name"] = "other.example/vendor/driver:1"
    members[1].data = json.dumps(index).encode()
    _, images = read(tmp_path, render(members))
    assert images[0].names == ("other.example/vendor/driver:1",)


def test_images_for_other_platforms_are_left_out_and_only_those_is_refused(tmp_path: Path) -> None:
    arm = json.loads(config_for(LAYERS))
    arm["architecture"] = "arm64"
    members = docker_archive(LAYERS)
    manifest = json.loads(members[-1].data)
    members.insert(-1, Member("arm.json", json.dumps(arm).encode()))
    members[-1].data = json.dumps([{**manifest[0], "Config": "arm.json", "RepoTags": ["reg.example/d:arm"]},
                                   *manifest]).encode()
    _, images = read(tmp_path / "both", render(members))
    assert [i.names for i in images] == [("reg.example/nvidia/driver:1",)]
    members[-1].data = json.dumps([{**manifest[0], "Config": "arm.json"}]).encode()
    with pytest.raises(ImageRejected, match="no image for linux/amd64 in it, only for linux/arm64"):
        read(tmp_path / "arm", render(members))


def test_an_index_keeps_its_digest_for_pins_and_signatures(tmp_path: Path) -> None:
    members = oci_archive(LAYERS)
    inner = json.loads(members[1].data)["manifests"][0]
    inner["platform"] = {"os": "linux", "architecture": "amd64"}
    index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                        "manifests": [inner]}).encode()
    members.append(Member(f"blobs/sha256/{digest(index)[7:]}", index))
    members[1].data = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest(index), "size": len(index),
         "annotations": {"org.opencontainers.image.ref.name": "1"}}]}).encode()
    _, images = read(tmp_path, render(members))
    assert images[0].image.index_digest == digest(index)
    assert images[0].manifest.digest == inner["digest"]


@pytest.mark.parametrize("bad", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000])
def test_json_nested_past_the_parser_is_refused_not_a_crash(tmp_path: Path, bad: bytes) -> None:
    for make, member in ((docker_archive, "manifest.json"), (oci_archive, "index.json")):
        members = make(LAYERS)
        next(m for m in members if m.name == member).data = bad
        with pytest.raises(ImageRejected):
            read(tmp_path / member, render(members))


def test_a_budget_is_enforced_before_a_member_is_written(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    written: list[str] = []
    with pytest.raises(ImageRejected, match="refused before writing it"):
        scan_tar(io.BytesIO(render(docker_archive(LAYERS))), store, "t", budget=15000, written=written)
    assert len(written) == 1, "the first layer fit, the second would not"


@pytest.mark.subprocess  # syncfs finds libc with ctypes.util, which runs ldconfig -p
def test_a_broken_gzip_archive_is_refused(tmp_path: Path) -> None:
    data = gzip.compress(render(docker_archive(LAYERS)))
    path = tmp_path / "image.tar.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageRejected, match="gzip"):
        ImageStore(tmp_path / "images").import_path(path, AMD64, default=None, as_ref=None)
    path.write_bytes(data)
    [(ref, _)] = ImageStore(tmp_path / "images").import_path(path, AMD64, default=None, as_ref=None)
    assert str(ref) == "reg.example/nvidia/driver:1"


def test_a_fifo_in_a_layout_directory_is_refused_not_waited_on(tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    (layout / "blobs/sha256").mkdir(parents=True)
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    os.mkfifo(layout / "index.json")
    with pytest.raises(ImageRejected, match="not a regular file"):
        scan_layout(layout, BlobStore(tmp_path / "store"), "layout")
