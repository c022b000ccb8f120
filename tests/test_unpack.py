"""Extraction and verification: hostile layers refused, whiteouts applied, the contract checked."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import DEFAULT_LIB64_ALLOW
from agent.errors import DigestMismatch, ImageRejected, KernelMismatch
from agent.install.modinfo import ModInfo, parse_modinfo, read_modinfo
from agent.install.unpack import GZIP_TYPES, ExtractedTree, Staging
from agent.install.verify import load_order, parse_manifest, verify_tree
from support.images import HOSTILE_KINDS, SPECIAL_MODES, compile_module, hostile_entries, tar_bytes, valid_tree_entries

GZ = next(iter(GZIP_TYPES))
KERNEL = "6.1.0-28-amd64"
pytestmark = pytest.mark.subprocess  # the trees carry modules compiled with gcc


class Extracted:
    """A staging directory after extraction, and what the agent read back from it."""

    def __init__(self, path: Path, tree: ExtractedTree) -> None:
        self.path = path
        self.tree = tree
        self.digests = tree.files


def extract(tmp_path: Path, *layers: bytes) -> Extracted:
    path = tmp_path / "staging"
    path.mkdir()
    with Staging(path) as staging:
        for i, layer in enumerate(layers):
            blob = tmp_path / f"layer{i}"
            blob.write_bytes(layer)
            staging.extract_layer(blob, GZ)
        return Extracted(path, staging.finish())


def verify(staged: Extracted, digests: dict[str, str] | None = None, **kwargs: str) -> object:
    args = {"driver_version": "535.261.03", "kernel": KERNEL} | kwargs
    tree = staged.tree if digests is None else ExtractedTree(digests, staged.tree.links, staged.tree.dirs)
    return verify_tree(staged.path, tree, lib64_allow=DEFAULT_LIB64_ALLOW, **args)


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
def test_hostile_entry_rejects_the_image_and_touches_nothing_outside(tmp_path: Path, kind: str) -> None:
    """'..', absolute paths, escaping links, devices, FIFOs and setuid bits are all refused."""
    outside = tmp_path / "etc"
    outside.mkdir()
    if kind in SPECIAL_MODES:
        entries = valid_tree_entries(extra_files={"bin/x": (b"#!/bin/sh\n", SPECIAL_MODES[kind])})
    else:
        entries = valid_tree_entries() + hostile_entries(kind)
    layer = tar_bytes(entries)
    with pytest.raises(ImageRejected):
        extract(tmp_path, layer)
    assert list(outside.iterdir()) == []
    assert not (tmp_path / "evil").exists()
    assert not Path("/tmp/pwned").exists()


def test_valid_tree_extracts_and_verifies(tmp_path: Path) -> None:
    """A contract-valid tree passes; digests were computed while writing; modules come in load order."""
    staging = extract(tmp_path, tar_bytes(valid_tree_entries()))
    verified = verify(staging)
    assert [m.name for m in verified.modules] == ["nvidia"]  # type: ignore[attr-defined]
    assert (staging.path / "lib64/libcuda.so.1").resolve() == (staging.path / "lib64/libcuda.so.535.261.03")
    assert set(staging.digests) == set(verified.manifest.files) | {"manifest.json"}  # type: ignore[attr-defined]


def test_entries_outside_the_tree_are_never_written(tmp_path: Path) -> None:
    """A base OS in the image is ignored: only nvidia-driver/ reaches the staging tree."""
    staging = extract(tmp_path, tar_bytes([("etc/", "dir"), ("etc/passwd", "file", b"root::0:0\n"),
                                           *valid_tree_entries()]))
    assert not (staging.path / "etc").exists()
    assert not (staging.path.parent / "etc").exists()


def test_whiteouts_and_opaque_directories_across_layers(tmp_path: Path) -> None:
    """Later layers delete files (.wh.name) and hide whole lower directories (.wh..wh..opq)."""
    lower = tar_bytes([("nvidia-driver/", "dir"), ("nvidia-driver/lib64/", "dir"),
                       ("nvidia-driver/lib64/old.so", "file", b"old"), ("nvidia-driver/share/", "dir"),
                       ("nvidia-driver/share/a", "file", b"a"), ("nvidia-driver/share/b", "file", b"b")])
    upper = tar_bytes([("nvidia-driver/lib64/.wh.old.so", "file", b""),
                       ("nvidia-driver/share/c", "file", b"c"),  # same layer, before the marker: kept
                       ("nvidia-driver/share/.wh..wh..opq", "file", b""),
                       ("nvidia-driver/.wh.never-existed", "file", b"")])
    staging = extract(tmp_path, lower, upper)
    assert not (staging.path / "lib64/old.so").exists()
    assert sorted(p.name for p in (staging.path / "share").iterdir()) == ["c"]
    assert set(staging.digests) == {"share/c"}


def test_replacing_a_file_with_a_symlink_updates_digests(tmp_path: Path) -> None:
    """An upper layer's entry replaces the lower one whatever its type."""
    lower = tar_bytes([("nvidia-driver/", "dir"), ("nvidia-driver/x", "file", b"1")])
    upper = tar_bytes([("nvidia-driver/y", "file", b"2"), ("nvidia-driver/x", "symlink", "y")])
    staging = extract(tmp_path, lower, upper)
    assert (staging.path / "x").is_symlink()
    assert set(staging.digests) == {"y"}


def test_unsupported_layer_media_type(tmp_path: Path) -> None:
    """zstd layers are refused by name, not misread."""
    with Staging(tmp_path) as staging, pytest.raises(ImageRejected, match=r"tar\+zstd"):
        staging.extract_layer(tmp_path / "x", "application/vnd.oci.image.layer.v1.tar+zstd")


def test_garbage_layer_is_rejected_not_crashing(tmp_path: Path) -> None:
    """A blob that is not a gzip tar is an image problem, reported as such."""
    with pytest.raises(ImageRejected, match="not a valid gzip stream"):
        extract(tmp_path, b"\x1f\x8b\x08\x00garbage")


def digests_of(staging: Extracted) -> dict[str, str]:
    return dict(staging.digests)


@pytest.mark.parametrize(("change", "message"), [
    ({"driver_version": "470.1"}, r"carries driver 535\.261\.03, configured driver is 470\.1"),
    ({"kernel": "6.1.0-27-amd64"}, r"built for kernel 6\.1\.0-28-amd64, this host runs 6\.1\.0-27-amd64"),
])
def test_verify_refuses_other_driver_or_kernel(tmp_path: Path, change: dict[str, str], message: str) -> None:
    """An image for another driver version or another kernel is never installed."""
    staging = extract(tmp_path, tar_bytes(valid_tree_entries()))
    with pytest.raises(ImageRejected, match=message):
        verify(staging, **change)


def test_verify_checks_module_vermagic_not_only_the_manifest(tmp_path: Path) -> None:
    """A manifest that claims the right kernel but carries modules built for another is caught."""
    wrong = compile_module("nvidia", driver="535.261.03", vermagic_kernel="6.1.0-27-amd64").read_bytes()
    entries = valid_tree_entries(extra_files={f"lib/modules/{KERNEL}/nvidia.ko": (wrong, 0o644)})
    staging = extract(tmp_path, tar_bytes(entries))
    with pytest.raises(KernelMismatch, match=r"vermagic '6\.1\.0-27-amd64"):
        verify(staging)


@pytest.mark.parametrize(("tamper", "message"), [
    ("extra", "present but not listed"),
    ("missing", "listed in the manifest but missing"),
    ("changed", "different from the manifest's digest"),
])
def test_verify_compares_every_file_with_the_manifest(tmp_path: Path, tamper: str, message: str) -> None:
    """Unlisted, missing and altered files each reject the tree."""
    staging = extract(tmp_path, tar_bytes(valid_tree_entries()))
    digests = digests_of(staging)
    if tamper == "extra":
        digests["lib64/extra.so"] = "sha256:" + "0" * 64
    elif tamper == "missing":
        del digests["bin/nvidia-smi"]
    else:
        digests["bin/nvidia-smi"] = "sha256:" + "0" * 64
    with pytest.raises(ImageRejected, match=message):
        verify(staging, digests)


@pytest.mark.parametrize(("doc", "message"), [
    (b"[]", "JSON object"),
    (b"{", "not JSON"),
    (b'{"schema_version": 2}', "schema_version 2"),
    (b'{"schema_version": 1, "driver_version": 5}', "driver_version must be"),
    (b'{"schema_version": 1, "driver_version": "1", "os_id": "a", "os_version": "1", "kernel_release": "k",'
     b' "modules": [], "files": {"../x": "sha256:' + b"0" * 64 + b'"}}', "normalized relative path"),
    (b'{"schema_version": 1, "driver_version": "1", "os_id": "a", "os_version": "1", "kernel_release": "k",'
     b' "modules": [], "files": {"x": "md5:1"}}', "sha256"),
])
def test_manifest_parse_errors(doc: bytes, message: str) -> None:
    """A malformed manifest is rejected with the field that is wrong."""
    with pytest.raises(ImageRejected, match=message):
        parse_manifest(doc)


def mod(name: str, *deps: str) -> ModInfo:
    return ModInfo(name, "", "1", deps, {})


def test_load_order_follows_depends_and_ignores_host_modules() -> None:
    """nvidia before nvidia_uvm and nvidia_modeset, nvidia_modeset before nvidia_drm; drm is the host's."""
    mods = {m.name: m for m in [mod("nvidia_drm", "drm", "nvidia_modeset"), mod("nvidia_uvm", "nvidia"),
                                mod("nvidia_modeset", "nvidia"), mod("nvidia")]}
    assert [m.name for m in load_order(mods)] == ["nvidia", "nvidia_modeset", "nvidia_drm", "nvidia_uvm"]


def test_load_order_refuses_a_cycle() -> None:
    """A dependency cycle is an image bug, reported with the cycle."""
    with pytest.raises(ImageRejected, match="cycle: a -> b -> a"):
        load_order({"a": mod("a", "b"), "b": mod("b", "a")})


def test_modinfo_reads_a_gcc_built_object(tmp_path: Path) -> None:
    """The ELF reader finds .modinfo in a real object file and splits depends."""
    info = read_modinfo(compile_module("nvidia-drm", driver="535.261.03", vermagic_kernel=KERNEL))
    assert info.name == "nvidia_drm"
    assert info.version == "535.261.03"
    assert info.vermagic.startswith(KERNEL + " ")
    assert set(info.depends) == {"nvidia_modeset", "drm"}


@pytest.mark.parametrize("data", [b"", b"\x7fELF", b"\x7fELF\x02\x01" + b"\0" * 60, b"MZ" + b"\0" * 100])
def test_modinfo_refuses_truncated_or_foreign_files(data: bytes) -> None:
    """Garbage is a ModinfoError (a ValueError), never an IndexError or a crash."""
    with pytest.raises(ValueError):
        parse_modinfo(data)


@given(st.data())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_modinfo_read_from_the_file_is_what_the_bytes_say(tmp_path: Path, data: st.DataObject) -> None:
    """read_modinfo reads only the ELF headers and sections it needs (a real nvidia.ko is ~60 MB); on a real
    module with bytes overwritten or cut anywhere, it agrees with parsing the whole file, refusals included."""
    module = bytearray(compile_module("nvidia-uvm", driver="535.261.03", vermagic_kernel=KERNEL).read_bytes())
    for _ in range(data.draw(st.integers(0, 4))):
        at = data.draw(st.integers(0, len(module) - 1))
        module[at:at + 8] = data.draw(st.binary(min_size=1, max_size=8))
    if data.draw(st.booleans()):
        del module[data.draw(st.integers(0, len(module))):]
    path = tmp_path / "m.ko"
    path.write_bytes(module)
    try:
        whole: object = parse_modinfo(bytes(module))
    except ValueError as exc:
        whole = type(exc)
    try:
        part: object = read_modinfo(path).fields
    except ValueError as exc:
        part = type(exc)
    assert part == whole


def test_a_directory_replaced_by_a_file_then_more_entries(tmp_path: Path) -> None:
    """A later entry replaces a whole directory (its subdirectories included) with a file, and entries in
    many other directories follow: each lands where its name says, nothing else moves."""
    entries: list[tuple[object, ...]] = [("nvidia-driver/", "dir"), ("nvidia-driver/x/", "dir"),
                                         ("nvidia-driver/x/deep/", "dir"), ("nvidia-driver/x/deep/f", "file", b"1")]
    entries += [(f"nvidia-driver/d{i}/f", "file", str(i).encode()) for i in range(80)]
    entries += [("nvidia-driver/x", "file", b"now a file")]
    entries += [(f"nvidia-driver/d{i}/g", "hardlink", f"nvidia-driver/d{i}/f") for i in range(80)]
    staged = extract(tmp_path, tar_bytes(entries))
    assert (staged.path / "x").read_bytes() == b"now a file"
    for i in range(80):
        assert (staged.path / f"d{i}/g").read_bytes() == str(i).encode()
        assert (staged.path / f"d{i}/g").stat().st_ino == (staged.path / f"d{i}/f").stat().st_ino
    assert staged.digests["d7/g"] == staged.digests["d7/f"]


def test_a_hardlink_may_not_replace_the_directory_of_its_own_target(tmp_path: Path) -> None:
    """`a` -> hardlink to `a/b/f` would delete its target first: refused as the image's fault."""
    entries = [("nvidia-driver/", "dir"), ("nvidia-driver/a/b/f", "file", b"x"),
               ("nvidia-driver/a", "hardlink", "nvidia-driver/a/b/f")]
    with pytest.raises(ImageRejected, match="replace the directory that holds its own target"):
        extract(tmp_path, tar_bytes(entries))


@pytest.mark.parametrize(("extra", "link", "message"), [
    ({"lib64/libc.so.6": (b"evil libc", 0o644)}, None, r"lib64/libc\.so\.6 is not a driver library"),
    ({"lib64/libstdc++.so.6": (b"x", 0o644)}, None, "is not a driver library"),
    ({"lib64/libnvidia-foo/libc.so.6": (b"x", 0o644)}, None, "is not a driver library"),  # * stops at /
    ({"bin/tool": (b"x", 0o755)}, ("lib64/libnvidia-tool.so.1", "../bin/tool"), "resolves outside lib64"),
    ({}, ("lib64/libm.so.6", "libcuda.so.535.261.03"), "is not a driver library"),
])
def test_lib64_holds_only_driver_libraries(tmp_path: Path, extra: dict[str, tuple[bytes, int]],
                                           link: tuple[str, str] | None, message: str) -> None:
    """lib64 is overlaid onto the host's library directory: a libc, a libstdc++ or any other name the
    allow-list does not know is refused, and a symlink there may not climb out of lib64 (the overlay
    would resolve it from /usr/lib64, into the host's /usr)."""
    entries = valid_tree_entries(extra_files=extra)
    if link:
        entries.append((f"nvidia-driver/{link[0]}", "symlink", link[1]))
    with pytest.raises(ImageRejected, match=message):
        verify(extract(tmp_path, tar_bytes(entries)))


def test_lib64_subdirectories_and_links_inside_it_pass(tmp_path: Path) -> None:
    """NVIDIA's own layout: gbm/nvidia-drm_gbm.so -> ../libnvidia-allocator.so.1 stays inside lib64."""
    entries = valid_tree_entries(extra_files={"lib64/libnvidia-allocator.so.535.261.03": (b"a", 0o644)})
    entries += [("nvidia-driver/lib64/gbm/", "dir"),
                ("nvidia-driver/lib64/libnvidia-allocator.so.1", "symlink", "libnvidia-allocator.so.535.261.03"),
                ("nvidia-driver/lib64/gbm/nvidia-drm_gbm.so", "symlink", "../libnvidia-allocator.so.1")]
    verify(extract(tmp_path, tar_bytes(entries)))


def test_the_allow_list_is_the_operators(tmp_path: Path) -> None:
    """An operator can allow a name the defaults refuse (install.lib64_allow)."""
    staged = extract(tmp_path, tar_bytes(valid_tree_entries(extra_files={"lib64/libvendor.so.1": (b"v", 0o644)})))
    with pytest.raises(ImageRejected):
        verify(staged)
    verify_tree(staged.path, staged.tree, driver_version="535.261.03", kernel=KERNEL,
                lib64_allow=(*DEFAULT_LIB64_ALLOW, "libvendor.so*"))


def test_a_layer_that_is_not_what_the_config_says_is_refused(tmp_path: Path) -> None:
    """The image config's diff_id is the digest of the uncompressed layer: another one is refused."""
    layer = tar_bytes(valid_tree_entries())
    (tmp_path / "blob").write_bytes(layer)
    good = "sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest()
    (tmp_path / "a").mkdir()
    with Staging(tmp_path / "a") as staging:
        staging.extract_layer(tmp_path / "blob", GZ, diff_id=good)
    (tmp_path / "b").mkdir()
    with Staging(tmp_path / "b") as staging, pytest.raises(DigestMismatch, match="diff_id is sha256:0000"):
        staging.extract_layer(tmp_path / "blob", GZ, diff_id="sha256:" + "0" * 64)


def test_symlink_resolution_is_bounded_for_the_whole_tree() -> None:
    """Thousands of links with long targets, chained: checking them stops at a step budget with one clear
    refusal instead of minutes of work."""
    from agent.install.unpack import LinkResolver  # noqa: PLC0415

    deep = "/".join(["d"] * 500)
    links = {f"l{i}": f"l{i + 1}/{deep}" for i in range(39)} | {"l39": "x"}
    resolver = LinkResolver(links, max_steps=100_000)
    with pytest.raises(ImageRejected, match="take too long to resolve"):
        for i in range(40):
            resolver.resolve(f"l{i}", floor=0)
