"""packaging/build-driver-image and tests/support/images.py against a real local registry."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from support import images

pytestmark = pytest.mark.integration

DRIVER = "535.261.03"
KERNEL = "6.1.0-28-amd64"
OS_ID = "flatcar"
OS_VERSION = "3815.2.0"
REPO = "nvidia/driver"
REGISTRY_READY_TIMEOUT_S = 15
TOOL_TIMEOUT_S = 60
TOOLS = ("docker-registry", "skopeo", "umoci", "gcc", "modinfo")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway Debian docker-registry on 127.0.0.1; yields "127.0.0.1:PORT"."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt: docker-registry skopeo umoci gcc kmod)")
    root = tmp_path_factory.mktemp("registry")
    host = f"127.0.0.1:{_free_port()}"
    config = root / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log: {level: warn}\n"
        f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
        f"http: {{addr: {host}}}\n"
    )
    with (root / "registry.log").open("wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + REGISTRY_READY_TIMEOUT_S
        while True:
            try:
                if requests.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"registry did not start:\n{(root / 'registry.log').read_text()}")
            time.sleep(0.05)
        yield host
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return images.make_driver_tree(
        tmp_path_factory.mktemp("tree") / "tree", driver=DRIVER, kernel=KERNEL
    )


@pytest.fixture(scope="module")
def pushed(registry: str, tree: Path) -> dict[str, str]:
    """One OCI amd64 and one Docker v2s2 arm64 image of the same tree; tag -> digest."""
    return {
        tag: images.build_image(
            tree, f"{registry}/{REPO}:{tag}", driver=DRIVER, os_id=OS_ID,
            os_version=OS_VERSION, kernel=KERNEL, fmt=fmt, arch=arch,
        )
        for tag, fmt, arch in (("oci-amd64", "oci", "amd64"), ("v2s2-arm64", "v2s2", "arm64"))
    }


def skopeo_inspect(ref: str, *flags: str) -> bytes:
    return subprocess.run(
        ["skopeo", "inspect", "--tls-verify=false", *flags, f"docker://{ref}"],
        check=True, capture_output=True, timeout=TOOL_TIMEOUT_S,
    ).stdout


def pull_layer_members(registry: str, tag: str) -> tuple[list[tarfile.TarInfo], dict[str, bytes]]:
    """The single layer of REPO:tag, fetched with requests: members and regular-file bodies."""
    _, body = images.get_manifest(registry, REPO, tag)
    (layer,) = json.loads(body)["layers"]
    blob = images.get_blob(registry, REPO, layer["digest"])
    assert images.sha256_digest(blob) == layer["digest"]
    return images.layer_members(blob), images.layer_files(blob)


@pytest.mark.parametrize(
    ("tag", "media_type", "arch"),
    [("oci-amd64", images.OCI_MANIFEST, "amd64"), ("v2s2-arm64", images.DOCKER_MANIFEST, "arm64")],
)
def test_script_pushes_image_skopeo_sees_type_and_arch(
    registry: str, pushed: dict[str, str], tag: str, media_type: str, arch: str
) -> None:
    """The script pushes an OCI manifest by default and a Docker v2s2 one with --format v2s2;
    skopeo reads the architecture and labels back, and the returned digest is the manifest's."""
    raw = skopeo_inspect(f"{registry}/{REPO}:{tag}", "--raw")
    assert images.sha256_digest(raw) == pushed[tag]
    # umoci's OCI manifest leaves the optional mediaType field out: the registry's
    # Content-Type is what says which kind it is.
    content_type, body = images.get_manifest(registry, REPO, tag)
    assert (content_type, body) == (media_type, raw)
    config = json.loads(skopeo_inspect(f"{registry}/{REPO}:{tag}", "--config"))
    assert (config["os"], config["architecture"]) == ("linux", arch)
    labels = config["config"]["Labels"]
    assert labels["io.nvidia-agent.driver-version"] == DRIVER
    assert labels["io.nvidia-agent.kernel-release"] == KERNEL


@pytest.mark.parametrize("tag", ["oci-amd64", "v2s2-arm64"])
def test_layer_holds_only_root_owned_nvidia_driver_tree_and_true_manifest(
    registry: str, pushed: dict[str, str], tree: Path, tag: str
) -> None:
    """Pulled back with plain requests, the layer has only nvidia-driver/ paths owned by 0:0,
    relative symlinks kept, and a manifest.json whose modules and digests match the layer."""
    members, contents = pull_layer_members(registry, tag)
    names = {m.name.rstrip("/") for m in members}
    assert all(n == "nvidia-driver" or n.startswith("nvidia-driver/") for n in names)
    assert all((m.uid, m.gid) == (0, 0) for m in members)
    links = {m.name: m.linkname for m in members if m.issym()}
    assert links["nvidia-driver/lib64/libcuda.so.1"] == f"libcuda.so.{DRIVER}"
    assert links["nvidia-driver/lib64/libcuda.so"] == "libcuda.so.1"
    manifest = json.loads(contents.pop("nvidia-driver/manifest.json"))
    assert manifest["schema_version"] == 1
    assert (manifest["driver_version"], manifest["kernel_release"]) == (DRIVER, KERNEL)
    assert (manifest["os_id"], manifest["os_version"]) == (OS_ID, OS_VERSION)
    assert manifest["modules"] == sorted(
        f"lib/modules/{KERNEL}/{m}.ko" for m in images.DEFAULT_MODULES
    )
    layer_files = {
        name.removeprefix("nvidia-driver/"): "sha256:" + hashlib.sha256(body).hexdigest()
        for name, body in contents.items()
    }
    assert manifest["files"] == layer_files
    assert (tree / "bin/nvidia-smi").read_bytes() == contents["nvidia-driver/bin/nvidia-smi"]
    smi = next(m for m in members if m.name == "nvidia-driver/bin/nvidia-smi")
    assert smi.mode & 0o7777 == 0o755


def test_manifest_only_writes_and_prints_manifest(tmp_path: Path) -> None:
    """--manifest-only writes TREE_DIR/manifest.json, prints it, and never lists itself, so
    running it again gives the same file."""
    tree = images.make_driver_tree(tmp_path / "t", driver=DRIVER, kernel=KERNEL, modules=["nvidia"])
    args = ("--manifest-only", "--driver-version", DRIVER, "--os-id", OS_ID,
            "--os-version", OS_VERSION, "--kernel-release", KERNEL, tree)
    first = images.run_build_script(*args)
    assert first.returncode == 0, first.stderr
    manifest = json.loads(first.stdout)
    assert json.loads((tree / "manifest.json").read_text()) == manifest
    assert manifest["modules"] == [f"lib/modules/{KERNEL}/nvidia.ko"]
    assert sorted(manifest["files"]) == [
        "bin/nvidia-smi",
        f"lib/modules/{KERNEL}/nvidia.ko",
        f"lib64/libcuda.so.{DRIVER}",
        f"lib64/libnvidia-ml.so.{DRIVER}",
    ]
    ko = (tree / f"lib/modules/{KERNEL}/nvidia.ko").read_bytes()
    assert manifest["files"][f"lib/modules/{KERNEL}/nvidia.ko"] == images.sha256_digest(ko)
    again = images.run_build_script(*args)
    assert again.returncode == 0
    assert again.stdout == first.stdout


def _setuid(tree: Path) -> str:
    (tree / "bin/nvidia-smi").chmod(0o4755)
    return "bin/nvidia-smi: setuid"


def _escaping_symlink(tree: Path) -> str:
    (tree / "lib64/esc").symlink_to("../../../../etc")
    return "lib64/esc: symlink ../../../../etc resolves outside the tree"


def _escaping_through_symlink(tree: Path) -> str:
    (tree / "lib64/here").symlink_to(".")
    (tree / "lib64/sneaky").symlink_to("here/../../..")
    return "lib64/sneaky: symlink here/../../.. resolves outside the tree"


def _symlink_chain_escape(tree: Path) -> str:
    (tree / "lib64/here").symlink_to(".")
    (tree / "lib64/esc").symlink_to("here/../../etc")
    return "lib64/esc: symlink here/../../etc resolves outside the tree"


def _absolute_symlink(tree: Path) -> str:
    (tree / "lib64/libx.so").symlink_to("/etc/shadow")
    return "lib64/libx.so: symlink to absolute path /etc/shadow"


def _fifo(tree: Path) -> str:
    os.mkfifo(tree / "lib64/pipe")
    return "lib64/pipe: not a regular file"


@pytest.mark.parametrize(
    "spoil",
    [
        _setuid,
        _escaping_symlink,
        _escaping_through_symlink,
        _symlink_chain_escape,
        _absolute_symlink,
        _fifo,
    ],
)
def test_script_refuses_tree_the_contract_refuses(
    registry: str, tmp_path: Path, spoil: Callable[[Path], str]
) -> None:
    """A setuid file, an absolute symlink, one that escapes (also one that escapes only once
    other symlinks are followed), or a FIFO makes the script exit non-zero naming the path
    and the rule, and nothing is pushed."""
    tree = images.make_driver_tree(tmp_path / "t", driver=DRIVER, kernel=KERNEL, modules=["nvidia"])
    expected = spoil(tree)
    tag = f"refused-{spoil.__name__.strip('_')}"
    result = images.run_build_script(
        "--driver-version", DRIVER, "--os-id", OS_ID, "--os-version", OS_VERSION,
        "--kernel-release", KERNEL, "--dest-tls-verify=false", tree, f"{registry}/{REPO}:{tag}",
    )
    assert result.returncode == 1
    assert "refusing tree" in result.stderr
    assert expected in result.stderr
    r = requests.get(f"http://{registry}/v2/{REPO}/manifests/{tag}", timeout=5)
    assert r.status_code == 404


def test_help_teaches_with_an_example() -> None:
    """--help shows a full example command line."""
    result = images.run_build_script("--help")
    assert result.returncode == 0
    assert "--kernel-release 6.1.0-28-amd64" in result.stdout
    assert "FROM scratch" in result.stdout


def test_modinfo_reads_fake_modules(tree: Path) -> None:
    """kmod's modinfo reads version, vermagic, name and depends from the gcc-built modules."""
    def field(module: str, name: str) -> str:
        path = tree / f"lib/modules/{KERNEL}/{module}.ko"
        return subprocess.run(
            ["modinfo", "-F", name, str(path)], check=True, capture_output=True, text=True,
            timeout=TOOL_TIMEOUT_S,
        ).stdout.rstrip("\n")

    assert field("nvidia", "vermagic") == f"{KERNEL} SMP preempt mod_unload modversions "
    assert field("nvidia", "version") == DRIVER
    assert field("nvidia", "depends") == ""
    assert field("nvidia-uvm", "depends") == "nvidia"
    assert field("nvidia-drm", "depends") == "nvidia-modeset,drm"
    assert field("nvidia-modeset", "name") == "nvidia_modeset"


@pytest.mark.parametrize(
    ("docker_list", "media_type"), [(False, images.OCI_INDEX), (True, images.DOCKER_LIST)]
)
def test_push_index_serves_multi_platform_manifest(
    registry: str, pushed: dict[str, str], docker_list: bool, media_type: str
) -> None:
    """push_index makes an OCI index or a Docker manifest list over existing per-arch
    manifests; the registry serves it with that Content-Type and the right platforms."""
    tag = "list" if docker_list else "index"
    entries = {"linux/amd64": pushed["oci-amd64"], "linux/arm64": pushed["v2s2-arm64"]}
    digest = images.push_index(registry, REPO, tag, entries, docker_manifest_list=docker_list)
    content_type, body = images.get_manifest(registry, REPO, tag)
    assert content_type == media_type
    assert images.sha256_digest(body) == digest
    index = json.loads(body)
    platforms = {m["platform"]["architecture"]: m for m in index["manifests"]}
    assert platforms["amd64"]["digest"] == pushed["oci-amd64"]
    assert platforms["amd64"]["mediaType"] == images.OCI_MANIFEST
    assert platforms["arm64"]["mediaType"] == images.DOCKER_MANIFEST
    raw = json.loads(skopeo_inspect(f"{registry}/{REPO}:{tag}", "--raw"))
    assert raw["mediaType"] == media_type


HOSTILE_MEMBER = {
    "dotdot": ("nvidia-driver/../../etc/evil", tarfile.REGTYPE, ""),
    "absolute": ("/etc/evil", tarfile.REGTYPE, ""),
    "abs_symlink": ("nvidia-driver/lib64/libx.so", tarfile.SYMTYPE, "/etc/shadow"),
    "escaping_symlink": ("nvidia-driver/lib64/esc", tarfile.SYMTYPE, "../../../../etc"),
    "symlink_chain_escape": ("nvidia-driver/lib64/esc", tarfile.SYMTYPE, "here/../../etc"),
    "symlink_then_write": ("nvidia-driver/lib64/d/pwned", tarfile.REGTYPE, ""),
    "write_through_symlink": ("nvidia-driver/lib64/d/pwned", tarfile.REGTYPE, ""),
    "hardlink_escape": ("nvidia-driver/lib64/passwd", tarfile.LNKTYPE, "/etc/passwd"),
    "device": ("nvidia-driver/lib64/mem", tarfile.CHRTYPE, ""),
    "fifo": ("nvidia-driver/lib64/pipe", tarfile.FIFOTYPE, ""),
    "setuid": ("nvidia-driver/bin/x", tarfile.REGTYPE, ""),
    "setgid": ("nvidia-driver/bin/x", tarfile.REGTYPE, ""),
    "sticky": ("nvidia-driver/bin/x", tarfile.REGTYPE, ""),
}


@pytest.mark.parametrize("kind", images.HOSTILE_KINDS)
def test_hostile_image_pushes_with_its_hostile_entry(registry: str, kind: str) -> None:
    """Each hostile kind pushes as an OCI image whose layer holds the hostile member as written,
    next to a manifest.json whose digests are right for the tree's regular files."""
    tag = f"hostile-{kind}"
    images.push_hostile_image(registry, REPO, tag, kind=kind)
    members, contents = pull_layer_members(registry, tag)
    by_name = {m.name: m for m in members}
    name, member_type, linkname = HOSTILE_MEMBER[kind]
    assert by_name[name].type == member_type
    assert by_name[name].linkname == linkname
    special = images.SPECIAL_MODES.get(kind)
    if special is not None:
        assert by_name[name].mode == special
    if kind == "symlink_then_write":
        assert by_name["nvidia-driver/lib64/d"].linkname == "/tmp"
    manifest = json.loads(contents["nvidia-driver/manifest.json"])
    for rel, digest in manifest["files"].items():
        assert images.sha256_digest(contents[f"nvidia-driver/{rel}"]) == digest
    assert manifest["modules"] == [f"lib/modules/{KERNEL}/nvidia.ko"]


def test_push_layers_image_keeps_whiteouts_in_order(registry: str) -> None:
    """push_layers_image pushes raw layers in order, gzip and plain tar, with whiteout and
    opaque-directory markers exactly as built by tar_bytes."""
    base = images.valid_tree_entries(
        extra_files={"lib64/old.so": (b"old", 0o644), "share/a": (b"a", 0o644)}
    )
    top = [
        ("nvidia-driver/lib64/.wh.old.so", "file", b""),
        ("nvidia-driver/share/.wh..wh..opq", "file", b""),
    ]
    layers = [images.tar_bytes(base), images.tar_bytes(top, compress=False)]
    digest = images.push_layers_image(registry, REPO, "whiteout", layers)
    content_type, body = images.get_manifest(registry, REPO, digest)
    assert content_type == images.OCI_MANIFEST
    manifest = json.loads(body)
    assert [layer["mediaType"] for layer in manifest["layers"]] == [
        images.OCI_LAYER_GZIP, images.OCI_LAYER_TAR,
    ]
    second = images.get_blob(registry, REPO, manifest["layers"][1]["digest"])
    assert [m.name for m in images.layer_members(second)] == [t[0] for t in top]
    config = json.loads(images.get_blob(registry, REPO, manifest["config"]["digest"]))
    assert config["rootfs"]["diff_ids"][1] == images.sha256_digest(layers[1])
