"""Driver images for tests, made by tools other than the agent: gcc, tar, umoci, skopeo, requests.

Two families:
- faithful images: `make_driver_tree` + `build_image` (packaging/build-driver-image, i.e.
  umoci + skopeo), and `push_index` for multi-platform indexes over them;
- hand-made images: `tar_bytes` + `push_layers_image` for whiteouts and odd layers, and
  `push_hostile_image` for the trees the contract refuses.
All registry traffic is plain HTTP to a registry on 127.0.0.1 started by the tests.
"""

from __future__ import annotations

import atexit
import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "packaging" / "build-driver-image"

DEFAULT_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")
DEFAULT_LIBS = ("libcuda.so", "libnvidia-ml.so")
# What each real module names in its depends= field (drm is the kernel's own).
MODULE_DEPENDS = {
    "nvidia": "",
    "nvidia-uvm": "nvidia",
    "nvidia-modeset": "nvidia",
    "nvidia-drm": "nvidia-modeset,drm",
    "nvidia-peermem": "nvidia,ib_core",
}

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)

IMAGE_ROOT = "nvidia-driver"
HTTP_TIMEOUT_S = 30
BUILD_TIMEOUT_S = 120
HOSTILE_KINDS = (
    "dotdot",
    "absolute",
    "abs_symlink",
    "escaping_symlink",
    "symlink_chain_escape",
    "symlink_then_write",
    "write_through_symlink",
    "hardlink_escape",
    "device",
    "fifo",
    "setuid",
    "setgid",
    "sticky",
)

# (path, type, content-or-target, mode); type is file, dir, symlink, hardlink, char, block, fifo.
# Shorter tuples are fine: ("a/", "dir") or ("a/f", "file", b"x").
Entry = tuple[Any, ...]

_compiled: dict[tuple[str, str, str, str], Path] = {}
_cache_dir: Path | None = None


# ---------------------------------------------------------------- driver trees


def _module_cache() -> Path:
    global _cache_dir  # noqa: PLW0603 - one compile cache per test process
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="fake-ko-"))
        atexit.register(shutil.rmtree, _cache_dir, True)
    return _cache_dir


def _c_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def compile_module(name: str, *, driver: str, vermagic_kernel: str, depends: str | None = None) -> Path:
    """A real ELF relocatable object whose .modinfo reads like the real module's.

    `modinfo` (kmod) reads version, vermagic, name and depends from it. Compiled once per
    (name, driver, kernel, depends) and process; copy the returned file, do not modify it.
    """
    if depends is None:
        depends = MODULE_DEPENDS.get(name, "")
    key = (name, driver, vermagic_kernel, depends)
    if key in _compiled:
        return _compiled[key]
    fields = [
        f"version={driver}",
        f"vermagic={vermagic_kernel} SMP preempt mod_unload modversions ",
        f"name={name.replace('-', '_')}",
        f"depends={depends}",
        "license=NVIDIA",
    ]
    body = "\\0".join(_c_string(f) for f in fields)
    source = (
        '__attribute__((section(".modinfo"), used, aligned(1)))\n'
        f'static const char modinfo[] = "{body}";\n'
        f"int {name.replace('-', '_')}_init(void) {{ return 0; }}\n"
    )
    out_dir = _module_cache() / f"{len(_compiled)}"
    out_dir.mkdir()
    (out_dir / "m.c").write_text(source)
    out = out_dir / f"{name}.ko"
    subprocess.run(
        ["gcc", "-c", "-O0", "-o", str(out), str(out_dir / "m.c")],
        check=True,
        capture_output=True,
        timeout=BUILD_TIMEOUT_S,
    )
    _compiled[key] = out
    return out


def make_driver_tree(
    root: Path,
    *,
    driver: str,
    kernel: str,
    modules: Iterable[str] = DEFAULT_MODULES,
    libs: Iterable[str] = DEFAULT_LIBS,
    vermagic_kernel: str | None = None,
) -> Path:
    """Create a driver tree at root (the future /nvidia-driver/) and return root.

    lib64/<lib>.<driver> with <lib>.1 and <lib> as relative symlinks, bin/nvidia-smi (a shell
    script printing the driver version), lib/modules/<kernel>/<module>.ko as real ELF objects.
    vermagic_kernel puts another kernel in the modules' vermagic (for mismatch tests).
    """
    lib64 = root / "lib64"
    bin_dir = root / "bin"
    module_dir = root / "lib" / "modules" / kernel
    for d in (lib64, bin_dir, module_dir):
        d.mkdir(parents=True, exist_ok=True)
    for lib in libs:
        real = lib64 / f"{lib}.{driver}"
        real.write_bytes(b"\x7fELF fake " + f"{lib} {driver}\n".encode() + bytes(range(256)))
        real.chmod(0o644)
        (lib64 / f"{lib}.1").symlink_to(real.name)
        (lib64 / lib).symlink_to(f"{lib}.1")
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho 'NVIDIA-SMI {driver}  Driver Version: {driver}'\n")
    smi.chmod(0o755)
    for name in modules:
        ko = compile_module(name, driver=driver, vermagic_kernel=vermagic_kernel or kernel)
        shutil.copyfile(ko, module_dir / f"{name}.ko")
        (module_dir / f"{name}.ko").chmod(0o644)
    return root


def run_build_script(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run packaging/build-driver-image with args; never raises on its exit status."""
    return subprocess.run(
        [str(BUILD_SCRIPT), *map(str, args)],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT_S,
    )


def build_image(
    tree: Path,
    dest_ref: str,
    *,
    driver: str,
    os_id: str,
    os_version: str,
    kernel: str,
    fmt: str = "oci",
    arch: str = "amd64",
) -> str:
    """Build tree into an image with packaging/build-driver-image, push it to dest_ref
    (plain HTTP) and return the pushed manifest's digest ("sha256:...")."""
    with tempfile.TemporaryDirectory(prefix="build-image-") as tmp:
        digestfile = Path(tmp, "digest")
        result = run_build_script(
            "--driver-version",
            driver,
            "--os-id",
            os_id,
            "--os-version",
            os_version,
            "--kernel-release",
            kernel,
            "--format",
            fmt,
            "--arch",
            arch,
            "--dest-tls-verify=false",
            "--digestfile",
            digestfile,
            tree,
            dest_ref,
        )
        if result.returncode != 0:
            raise RuntimeError(f"build-driver-image failed ({result.returncode}):\n{result.stderr}")
        return digestfile.read_text().strip()


# ---------------------------------------------------------------- registry API


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # loopback only: never a proxy from the environment
    return session


def _base(registry_host: str, repo: str) -> str:
    return f"http://{registry_host}/v2/{repo}"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def push_blob(registry_host: str, repo: str, data: bytes) -> str:
    """Monolithic upload (POST then PUT ?digest=); returns the blob digest."""
    digest = sha256_digest(data)
    with _session() as s:
        start = s.post(f"{_base(registry_host, repo)}/blobs/uploads/", timeout=HTTP_TIMEOUT_S)
        start.raise_for_status()
        location = urljoin(f"http://{registry_host}/", start.headers["Location"])
        done = s.put(
            location,
            params={"digest": digest},
            data=data,
            timeout=HTTP_TIMEOUT_S,
            headers={"Content-Type": "application/octet-stream"},
        )
        done.raise_for_status()
    return digest


def push_manifest(registry_host: str, repo: str, ref: str, body: bytes, media_type: str) -> str:
    """PUT a manifest (or index) under a tag or digest; returns its digest."""
    with _session() as s:
        r = s.put(
            f"{_base(registry_host, repo)}/manifests/{ref}",
            data=body,
            headers={"Content-Type": media_type},
            timeout=HTTP_TIMEOUT_S,
        )
        if r.status_code != 201:
            raise RuntimeError(f"PUT manifest {repo}:{ref}: {r.status_code} {r.text}")
    return sha256_digest(body)


def get_manifest(registry_host: str, repo: str, ref: str) -> tuple[str, bytes]:
    """GET a manifest accepting every type; returns (Content-Type, raw body)."""
    with _session() as s:
        r = s.get(
            f"{_base(registry_host, repo)}/manifests/{ref}",
            headers={"Accept": ", ".join(ALL_MANIFEST_TYPES)},
            timeout=HTTP_TIMEOUT_S,
        )
        r.raise_for_status()
        return r.headers["Content-Type"], r.content


def get_blob(registry_host: str, repo: str, digest: str) -> bytes:
    with _session() as s:
        r = s.get(f"{_base(registry_host, repo)}/blobs/{digest}", timeout=HTTP_TIMEOUT_S)
        r.raise_for_status()
        return r.content


def _platform(key: str) -> dict[str, str]:
    """ "linux/arm64/v8" -> {"os": "linux", "architecture": "arm64", "variant": "v8"}."""
    parts = key.split("/")
    platform = {"os": parts[0], "architecture": parts[1]}
    if len(parts) > 2:
        platform["variant"] = parts[2]
    return platform


def push_index(
    registry_host: str,
    repo: str,
    tag: str,
    entries: Mapping[str, str],
    *,
    docker_manifest_list: bool = False,
) -> str:
    """Push a multi-platform OCI index (or a Docker manifest list) under tag; return its digest.

    entries maps "linux/amd64" (optionally "/variant") to the digest of a manifest that already
    exists in the same repository; each entry's media type and size are read from the registry.
    """
    manifests = []
    for platform, digest in entries.items():
        media_type, body = get_manifest(registry_host, repo, digest)
        manifests.append(
            {
                "mediaType": media_type.split(";")[0],
                "digest": digest,
                "size": len(body),
                "platform": _platform(platform),
            }
        )
    media_type = DOCKER_LIST if docker_manifest_list else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}
    return push_manifest(registry_host, repo, tag, json.dumps(index).encode(), media_type)


# ---------------------------------------------------------------- hand-made layers


def tar_bytes(entries: Iterable[Entry], *, compress: bool = True) -> bytes:
    """A tar (gzip unless compress=False) with members exactly as given, owned by 0:0.

    Each entry is (path, type, content-or-target, mode): file content is bytes, symlink and
    hardlink take the link target, char/block take (major, minor). Paths are written as
    given, so "nvidia-driver/../../etc/evil" and "/etc/evil" stay hostile.
    """
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            path, kind = entry[0], entry[1]
            payload = entry[2] if len(entry) > 2 else None
            info = tarfile.TarInfo(path)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            info.mtime = 0
            data = None
            if kind == "file":
                data = payload or b""
                info.type, info.size, info.mode = tarfile.REGTYPE, len(data), 0o644
            elif kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
            elif kind in ("symlink", "hardlink"):
                info.type = tarfile.SYMTYPE if kind == "symlink" else tarfile.LNKTYPE
                info.linkname = str(payload)
                info.mode = 0o777 if kind == "symlink" else 0o644
            elif kind in ("char", "block"):
                info.type = tarfile.CHRTYPE if kind == "char" else tarfile.BLKTYPE
                info.devmajor, info.devminor = payload or (1, 3)
                info.mode = 0o666
            elif kind == "fifo":
                info.type, info.mode = tarfile.FIFOTYPE, 0o644
            else:
                raise ValueError(f"unknown entry type {kind!r} for {path}")
            if len(entry) > 3 and entry[3] is not None:
                info.mode = entry[3]
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def manifest_json(files: Mapping[str, bytes], *, driver: str, kernel: str, os_id: str, os_version: str) -> bytes:
    """The contract's manifest.json for regular files given relative to /nvidia-driver/."""
    module_dir = f"lib/modules/{kernel}/"
    manifest = {
        "schema_version": 1,
        "driver_version": driver,
        "os_id": os_id,
        "os_version": os_version,
        "kernel_release": kernel,
        "modules": sorted(p for p in files if p.startswith(module_dir) and p.endswith(".ko")),
        "files": {p: sha256_digest(files[p]) for p in sorted(files)},
    }
    return json.dumps(manifest, indent=2).encode()


def valid_tree_entries(
    *,
    driver: str = "535.261.03",
    kernel: str = "6.1.0-28-amd64",
    os_id: str = "flatcar",
    os_version: str = "3815.2.0",
    extra_files: Mapping[str, tuple[bytes, int]] | None = None,
) -> list[Entry]:
    """Tar entries of a small contract-valid tree under nvidia-driver/ with its manifest.json.

    extra_files maps relative paths to (content, mode); they are listed in the manifest too.
    """
    files: dict[str, tuple[bytes, int]] = {
        f"lib64/libcuda.so.{driver}": (f"fake libcuda {driver}\n".encode(), 0o644),
        "bin/nvidia-smi": (f"#!/bin/sh\necho 'Driver Version: {driver}'\n".encode(), 0o755),
        f"lib/modules/{kernel}/nvidia.ko": (
            compile_module("nvidia", driver=driver, vermagic_kernel=kernel).read_bytes(),
            0o644,
        ),
    }
    files.update(extra_files or {})
    manifest = manifest_json(
        {p: content for p, (content, _mode) in files.items()},
        driver=driver,
        kernel=kernel,
        os_id=os_id,
        os_version=os_version,
    )
    dirs = sorted({str(Path(p).parent) for p in files} - {"."})
    all_dirs = sorted({str(parent) for d in dirs for parent in [Path(d), *Path(d).parents]} - {"."})
    entries: list[Entry] = [(f"{IMAGE_ROOT}/", "dir")]
    entries += [(f"{IMAGE_ROOT}/{d}/", "dir") for d in all_dirs]
    entries.append((f"{IMAGE_ROOT}/manifest.json", "file", manifest, 0o644))
    entries += [(f"{IMAGE_ROOT}/{p}", "file", c, m) for p, (c, m) in sorted(files.items())]
    entries.append((f"{IMAGE_ROOT}/lib64/libcuda.so.1", "symlink", f"libcuda.so.{driver}"))
    return entries


def _layer_media_type(layer: bytes, fmt: str) -> str:
    gzipped = layer[:2] == b"\x1f\x8b"
    if fmt == "v2s2":
        if not gzipped:
            raise ValueError("Docker v2 schema 2 layers must be gzip")
        return DOCKER_LAYER_GZIP
    return OCI_LAYER_GZIP if gzipped else OCI_LAYER_TAR


def push_layers_image(
    registry_host: str,
    repo: str,
    tag: str,
    layers: list[bytes],
    *,
    arch: str = "amd64",
    fmt: str = "oci",
    layer_media_types: list[str] | None = None,
    labels: Mapping[str, str] | None = None,
    edit_manifest: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Push an image made of raw tar or tar+gzip layers (first layer first); return its digest.

    Media types follow each layer's bytes unless layer_media_types says otherwise (e.g. a
    zstd type the agent must refuse). edit_manifest may change the manifest dict before it
    is pushed (a wrong size, say). fmt="v2s2" pushes a Docker v2 schema 2 manifest.
    """
    diff_ids = [sha256_digest(gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer) for layer in layers]
    config = {
        "architecture": arch,
        "os": "linux",
        "config": {"Labels": dict(labels or {})},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "tests/support/images.py"} for _ in layers],
    }
    config_body = json.dumps(config).encode()
    media_types = layer_media_types or [_layer_media_type(layer, fmt) for layer in layers]
    layer_descriptors = [
        {
            "mediaType": media_type,
            "digest": push_blob(registry_host, repo, layer),
            "size": len(layer),
        }
        for layer, media_type in zip(layers, media_types, strict=True)
    ]
    manifest_type = DOCKER_MANIFEST if fmt == "v2s2" else OCI_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {
            "mediaType": DOCKER_CONFIG if fmt == "v2s2" else OCI_CONFIG,
            "digest": push_blob(registry_host, repo, config_body),
            "size": len(config_body),
        },
        "layers": layer_descriptors,
    }
    if edit_manifest is not None:
        edit_manifest(manifest)
    return push_manifest(registry_host, repo, tag, json.dumps(manifest).encode(), manifest_type)


def hostile_entries(kind: str) -> list[Entry]:
    """The one bad member (or pair) of each hostile kind, to add to a valid tree."""
    root = IMAGE_ROOT
    evil = b"pwned\n"
    hostile: dict[str, list[Entry]] = {
        "dotdot": [(f"{root}/../../etc/evil", "file", evil)],
        "absolute": [("/etc/evil", "file", evil)],
        "abs_symlink": [(f"{root}/lib64/libx.so", "symlink", "/etc/shadow")],
        "escaping_symlink": [(f"{root}/lib64/esc", "symlink", "../../../../etc")],
        # Lexically lib64/here/../../etc is "etc", inside; on disk here is lib64 itself, so
        # the link lands one level above the tree. Only real resolution catches it.
        "symlink_chain_escape": [
            (f"{root}/lib64/here", "symlink", "."),
            (f"{root}/lib64/esc", "symlink", "here/../../etc"),
        ],
        "symlink_then_write": [
            (f"{root}/lib64/d", "symlink", "/tmp"),
            (f"{root}/lib64/d/pwned", "file", evil),
        ],
        # The symlink alone is fine (relative, inside); writing through it is what is refused.
        "write_through_symlink": [
            (f"{root}/lib64/d", "symlink", "."),
            (f"{root}/lib64/d/pwned", "file", evil),
        ],
        "hardlink_escape": [(f"{root}/lib64/passwd", "hardlink", "/etc/passwd")],
        "device": [(f"{root}/lib64/mem", "char", (1, 1))],
        "fifo": [(f"{root}/lib64/pipe", "fifo")],
    }
    if kind in hostile:
        return hostile[kind]
    raise ValueError(f"unknown hostile kind {kind!r}; known: {', '.join(HOSTILE_KINDS)}")


SPECIAL_MODES = {"setuid": 0o4755, "setgid": 0o2755, "sticky": 0o1755}


def push_hostile_image(
    registry_host: str,
    repo: str,
    tag: str,
    *,
    kind: str,
    driver: str = "535.261.03",
    kernel: str = "6.1.0-28-amd64",
    os_id: str = "flatcar",
    os_version: str = "3815.2.0",
) -> str:
    """Push a one-layer OCI image that is contract-valid except for one hostile entry.

    kind is one of HOSTILE_KINDS. For setuid/setgid/sticky the file bin/x carries the bit and
    is listed in manifest.json with its right digest; the other hostile members are not
    listed (they are not regular files inside the tree). Returns the manifest digest.
    """
    extra = {"bin/x": (b"#!/bin/sh\nid\n", SPECIAL_MODES[kind])} if kind in SPECIAL_MODES else {}
    entries = valid_tree_entries(driver=driver, kernel=kernel, os_id=os_id, os_version=os_version, extra_files=extra)
    if kind not in SPECIAL_MODES:
        entries += hostile_entries(kind)
    return push_layers_image(registry_host, repo, tag, [tar_bytes(entries)])


def layer_members(layer: bytes) -> list[tarfile.TarInfo]:
    """The members of a tar or tar+gzip layer, in order."""
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
        return tar.getmembers()


def layer_files(layer: bytes) -> dict[str, bytes]:
    """The regular files of a tar or tar+gzip layer: member name -> content."""
    files = {}
    with tarfile.open(fileobj=io.BytesIO(layer), mode="r:*") as tar:
        for member in tar.getmembers():
            body = tar.extractfile(member) if member.isreg() else None
            if body is not None:
                files[member.name] = body.read()
    return files
