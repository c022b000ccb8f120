#!/usr/bin/env python3
"""Driver trees for the QEMU guest tests, built on this host with real tools.

Two kinds of tree, both laid out as docs/driver-image.md wants (lib64/, bin/,
lib/modules/<kernel>/, lib/firmware/nvidia/<driver>/):

- a *loadable* tree (`build_loadable_tree`): small real kernel modules named
  nvidia, nvidia-uvm, nvidia-modeset and nvidia-drm (tests/vm/guest/modules/),
  compiled against the guest kernel's headers, with real inter-module symbol
  dependencies, a `drm` dependency and char devices like the real driver's; a
  real `libnvidia-ml.so.<driver>` and an `nvidia-smi` linked against it
  (tests/vm/guest/userspace/). They load in a stock Debian guest. Beside the
  tree, `fake_gpu_pci-<kernel>.ko` puts NVIDIA GPUs on a virtual PCI bus.
- the *real* tree (`build_real_tree`): NVIDIA's 535 driver from Debian's
  non-free/contrib components, kernel modules compiled here against the same
  headers. It is large (hundreds of MB) and takes minutes; it is cached.

`push_trees` turns trees into images with packaging/build-driver-image and
pushes them as `nvidia/driver:<driver>-debian-12-<kernel>`, the agent's
default tag for a Debian 12 host running that kernel.

Everything runs as documented tools do (make/Kbuild, gcc, apt-get download,
dpkg-deb, strip, umoci, skopeo); the apt mirror is read from this machine's
own apt sources at run time and never written into the repository.

CLI:  build_trees.py kernels
      build_trees.py loadable OUT [--kernel K]... [--driver V]
      build_trees.py real OUT [--kernel K] [--cache-dir D] [--refresh]
      build_trees.py push REGISTRY TREE...
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
GUEST_DIR = HERE / "guest"
MODULE_SRC = GUEST_DIR / "modules"
USERSPACE_SRC = GUEST_DIR / "userspace"
BUILD_SCRIPT = REPO_ROOT / "packaging" / "build-driver-image"

DEFAULT_DRIVER = "535.999.01"
LOADABLE_MODULES = ("nvidia", "nvidia-uvm", "nvidia-modeset", "nvidia-drm")
FAKE_GPU_MODULE = "fake_gpu_pci"
REPOSITORY = "nvidia/driver"
OS_ID = "debian"
OS_VERSION = "12"

# The Debian packages of the real driver (non-free, plus contrib for
# persistenced and modprobe) and the NVIDIA libraries libcuda1 depends on.
REAL_PACKAGES = (
    "nvidia-kernel-source",
    "libcuda1",
    "libnvidia-ptxjitcompiler1",
    "libnvidia-pkcs11-openssl3",
    "libnvidia-ml1",
    "libnvidia-cfg1",
    "nvidia-smi",
    "firmware-nvidia-gsp",
    "nvidia-persistenced",
    "nvidia-modprobe",
)
# nvidia-peermem needs InfiniBand (ib_core) and is not part of a compute node's basic set.
REAL_EXCLUDED_MODULES = ("nvidia-peermem",)
REAL_COMPONENTS = "main contrib non-free non-free-firmware"

KBUILD_TIMEOUT_S = 300
REAL_BUILD_TIMEOUT_S = 3600
APT_TIMEOUT_S = 600
TOOL_TIMEOUT_S = 120


class BuildError(RuntimeError):
    """A build step failed; the message carries the tool's output."""


# ---------------------------------------------------------------- helpers


def _run(argv: Sequence[str | Path], *, cwd: Path | None = None, timeout: float = TOOL_TIMEOUT_S,
         env: dict[str, str] | None = None) -> str:
    """Run a tool; return its stdout, or raise BuildError with its output."""
    cmd = [str(a) for a in argv]
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BuildError(f"{' '.join(cmd)}: timed out after {timeout} s") from exc
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-6000:]
        raise BuildError(f"{' '.join(cmd)} exited with {result.returncode}:\n{tail}")
    return result.stdout


def default_cache_root() -> Path:
    """$NVIDIA_AGENT_VM_CACHE, else /var/cache/nvidia-agent-vm when writable, else ~/.cache."""
    env = os.environ.get("NVIDIA_AGENT_VM_CACHE")
    if env:
        return Path(env)
    system = Path("/var/cache/nvidia-agent-vm")
    parent = system if system.exists() else system.parent
    if os.access(parent, os.W_OK):
        return system
    return Path.home() / ".cache" / "nvidia-agent-vm"


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive flock on directory/.lock: one builder per cache entry at a time."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sources_hash(*dirs: Path) -> str:
    digest = hashlib.sha256()
    for d in dirs:
        for path in sorted(p for p in d.rglob("*") if p.is_file()):
            digest.update(path.relative_to(d.parent).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _copy_tree(src: Path, dest: Path, *, hardlink: bool = False) -> None:
    """Replace dest with a copy of src (symlinks kept; hardlinks where asked and possible)."""
    if dest.exists() or dest.is_symlink():
        shutil.rmtree(dest)
    if hardlink:
        try:
            _run(["cp", "-a", "--link", src, dest], timeout=TOOL_TIMEOUT_S)
            return
        except BuildError:
            shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest, symlinks=True)


# ---------------------------------------------------------------- kernels


def host_kernels() -> list[str]:
    """The kernel releases to build for: Debian's default flavour (the version
    linux-headers-amd64 depends on, e.g. 6.1.0-56-amd64) and its cloud flavour
    (6.1.0-56-cloud-amd64), the same release with another `uname -r`."""
    depends = _run(["dpkg-query", "-W", "-f=${Depends}", "linux-headers-amd64"])
    match = re.search(r"linux-headers-(\d+\.\d+\.\d+-\d+)-amd64", depends)
    if not match:
        raise BuildError(f"cannot read the kernel version from linux-headers-amd64's Depends: {depends!r}")
    base = match.group(1)
    return [f"{base}-amd64", f"{base}-cloud-amd64"]


def headers_dir(kver: str) -> Path:
    """/usr/src/linux-headers-<kver> (the Kbuild output dir of that kernel's headers)."""
    path = Path("/usr/src") / f"linux-headers-{kver}"
    if not (path / "Module.symvers").is_file():
        raise BuildError(
            f"no kernel headers for {kver} in {path}: apt-get install --no-install-recommends linux-headers-{kver}")
    return path


def headers_common_dir(kver: str) -> Path:
    """The shared source half of Debian's split headers (linux-headers-<ver>-common).

    NVIDIA's Makefile needs it as SYSSRC; the flavour dir as SYSSRC fails (no stdarg.h)."""
    link = Path("/lib/modules") / kver / "source"
    if link.is_dir():
        return link.resolve()
    match = re.match(r"^(\d+\.\d+\.\d+-\d+)-", kver)
    if match:
        common = Path("/usr/src") / f"linux-headers-{match.group(1)}-common"
        if common.is_dir():
            return common
    raise BuildError(f"cannot find the -common headers of {kver}")


# ---------------------------------------------------------------- loadable tree


def build_modules(kver: str, workdir: Path, *, driver: str = DEFAULT_DRIVER) -> dict[str, Path]:
    """Compile tests/vm/guest/modules/ against kver's headers in workdir (a copy of the
    sources); return {module file stem: .ko path} for the four nvidia* modules and fake_gpu_pci."""
    build = workdir / f"modules-{kver}"
    if build.exists():
        shutil.rmtree(build)
    shutil.copytree(MODULE_SRC, build)
    _run(["make", "-C", headers_dir(kver), f"M={build}", f"NVIDIA_VERSION={driver}", "modules"],
         timeout=KBUILD_TIMEOUT_S)
    built = {}
    for name in (*LOADABLE_MODULES, FAKE_GPU_MODULE):
        ko = build / f"{name}.ko"
        if not ko.is_file():
            raise BuildError(f"Kbuild did not produce {ko}")
        built[name] = ko
    return built


def build_userspace(workdir: Path, *, driver: str = DEFAULT_DRIVER) -> dict[str, Path]:
    """Build libnvidia-ml.so.<driver> (soname libnvidia-ml.so.1), nvidia-smi linked against
    it, and the nvidia-persistenced stand-in with the host gcc (the guest has the same glibc)."""
    out = workdir / "userspace"
    out.mkdir(parents=True, exist_ok=True)
    lib = out / f"libnvidia-ml.so.{driver}"
    cflags = ["-O2", "-Wall", "-Wextra", "-Werror", f'-DNVIDIA_VERSION="{driver}"']
    _run(["gcc", *cflags, "-fPIC", "-shared", "-Wl,-soname,libnvidia-ml.so.1", "-o", lib,
          USERSPACE_SRC / "libnvidia-ml.c"])
    # Link against the soname as the real nvidia-smi does: NEEDED libnvidia-ml.so.1.
    (out / "libnvidia-ml.so.1").unlink(missing_ok=True)
    (out / "libnvidia-ml.so.1").symlink_to(lib.name)
    smi = out / "nvidia-smi"
    _run(["gcc", *cflags, "-o", smi, USERSPACE_SRC / "nvidia-smi.c", f"-L{out}", "-l:libnvidia-ml.so.1"])
    persistenced = out / "nvidia-persistenced"
    _run(["gcc", *cflags, "-o", persistenced, USERSPACE_SRC / "nvidia-persistenced.c"])
    return {"lib": lib, "nvidia-smi": smi, "nvidia-persistenced": persistenced}


def loadable_tree_name(kver: str, driver: str = DEFAULT_DRIVER) -> str:
    return f"nvidia-{driver}-{kver}"


def build_loadable_tree(kver: str, out: Path, driver: str = DEFAULT_DRIVER, *,
                        cache_dir: Path | None = None) -> Path:
    """Build (or take from the cache) the loadable tree for kver and driver version.

    Returns out/nvidia-<driver>-<kver>/ holding lib/modules/<kver>/{nvidia,nvidia-uvm,
    nvidia-modeset,nvidia-drm}.ko, lib64/libnvidia-ml.so.<driver> (+ .so.1 and .so symlinks),
    bin/nvidia-smi and bin/nvidia-persistenced. Also writes out/fake_gpu_pci-<kver>.ko.
    The cache (cache_dir, default <cache root>/loadable) is keyed by kver, driver and a hash
    of the C sources; a hit costs a small copy.
    """
    out = Path(out)
    cache_root = Path(cache_dir) if cache_dir else default_cache_root() / "loadable"
    key = f"{kver}-{driver}-{_sources_hash(MODULE_SRC, USERSPACE_SRC)}"
    entry = cache_root / key
    with _locked(cache_root):
        if not (entry / "complete").is_file():
            _assemble_loadable(kver, driver, entry)
            # Entries for older sources of the same kernel and driver are dead weight.
            for stale in cache_root.glob(f"{kver}-{driver}-*"):
                if stale != entry and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    tree = out / loadable_tree_name(kver, driver)
    _copy_tree(entry / "tree", tree)
    shutil.copyfile(entry / f"{FAKE_GPU_MODULE}.ko", out / f"{FAKE_GPU_MODULE}-{kver}.ko")
    return tree


def _assemble_loadable(kver: str, driver: str, entry: Path) -> None:
    if entry.exists():
        shutil.rmtree(entry)
    entry.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="vm-loadable-") as tmp:
        work = Path(tmp)
        modules = build_modules(kver, work, driver=driver)
        userspace = build_userspace(work, driver=driver)
        tree = entry / "tree"
        module_dir = tree / "lib" / "modules" / kver
        lib64, bin_dir = tree / "lib64", tree / "bin"
        for d in (module_dir, lib64, bin_dir):
            d.mkdir(parents=True)
        for name in LOADABLE_MODULES:
            dest = module_dir / f"{name}.ko"
            shutil.copyfile(modules[name], dest)
            _run(["strip", "--strip-debug", dest])
            dest.chmod(0o644)
        lib = lib64 / userspace["lib"].name
        shutil.copyfile(userspace["lib"], lib)
        lib.chmod(0o755)
        (lib64 / "libnvidia-ml.so.1").symlink_to(lib.name)
        (lib64 / "libnvidia-ml.so").symlink_to("libnvidia-ml.so.1")
        for prog in ("nvidia-smi", "nvidia-persistenced"):
            shutil.copyfile(userspace[prog], bin_dir / prog)
            (bin_dir / prog).chmod(0o755)
        fake = entry / f"{FAKE_GPU_MODULE}.ko"
        shutil.copyfile(modules[FAKE_GPU_MODULE], fake)
        _run(["strip", "--strip-debug", fake])
    (entry / "complete").write_text(json.dumps({"kernel": kver, "driver": driver}) + "\n")


# ---------------------------------------------------------------- real tree


def _host_apt_sources() -> list[dict[str, str]]:
    """This machine's `deb` sources (deb822 and one-line), as {URIs, Suites, Signed-By}."""
    sources: list[dict[str, str]] = []
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line.startswith("#") or ":" not in line or line[:1].isspace():
                    continue
                k, _, v = line.partition(":")
                fields[k.strip()] = v.strip()
            if "deb" not in fields.get("Types", "").split() or fields.get("Enabled", "yes") == "no":
                continue
            if "URIs" in fields and "Suites" in fields:
                sources.append({k: fields[k] for k in ("URIs", "Suites", "Signed-By") if k in fields})
    one_line = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*.list"))]
    for path in one_line:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            match = re.match(r"^\s*deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)", line)
            if not match:
                continue
            opts = dict(o.split("=", 1) for o in (match.group(1) or "").split() if "=" in o)
            entry = {"URIs": match.group(2), "Suites": match.group(3)}
            if "signed-by" in opts:
                entry["Signed-By"] = opts["signed-by"]
            sources.append(entry)
    debian = [s for s in sources if any(suite.startswith("bookworm") for suite in s["Suites"].split())]
    if not debian:
        raise BuildError("no Debian bookworm source in this machine's apt sources")
    return debian


class _Apt:
    """apt-get with its own sources (the host's mirrors + contrib/non-free), lists and cache
    under `root`: the machine's own apt configuration and state are left alone."""

    def __init__(self, root: Path) -> None:
        self.root = root
        parts = root / "sources.list.d"
        parts.mkdir(parents=True, exist_ok=True)
        for sub in ("lists/partial", "cache/archives/partial"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        stanzas = []
        for source in _host_apt_sources():
            lines = ["Types: deb", f"URIs: {source['URIs']}", f"Suites: {source['Suites']}",
                     f"Components: {REAL_COMPONENTS}"]
            if "Signed-By" in source:
                lines.append(f"Signed-By: {source['Signed-By']}")
            stanzas.append("\n".join(lines))
        # Generated at run time from the host's sources; lives only in the cache dir.
        (parts / "nvidia.sources").write_text("\n\n".join(stanzas) + "\n")
        self.options = [
            "-o", "Dir::Etc::SourceList=/dev/null",
            "-o", f"Dir::Etc::SourceParts={parts}",
            "-o", f"Dir::State::Lists={root / 'lists'}",
            "-o", f"Dir::Cache={root / 'cache'}",
            "-o", "Dir::State::status=/dev/null",
        ]
        if os.geteuid() == 0:
            self.options += ["-o", "APT::Sandbox::User=root"]

    def update(self) -> None:
        _run(["apt-get", *self.options, "-q", "update"], timeout=APT_TIMEOUT_S)

    def candidate_versions(self, packages: Sequence[str]) -> dict[str, str]:
        text = _run(["apt-cache", *self.options, "show", "--no-all-versions", *packages], timeout=APT_TIMEOUT_S)
        versions: dict[str, str] = {}
        name = None
        for line in text.splitlines():
            if line.startswith("Package: "):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Version: ") and name:
                versions.setdefault(name, line.split(":", 1)[1].strip())
        missing = sorted(set(packages) - set(versions))
        if missing:
            raise BuildError(f"not in the apt sources (non-free/contrib): {', '.join(missing)}")
        return versions

    def download(self, pins: dict[str, str], dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", *self.options, "-q", "download", *(f"{p}={v}" for p, v in sorted(pins.items()))],
             cwd=dest, timeout=APT_TIMEOUT_S)
        return sorted(dest.glob("*.deb"))


def _upstream(version: str) -> str:
    """535.309.01-0+deb12u1 -> 535.309.01 (no epoch, no Debian revision)."""
    return version.split(":", 1)[-1].rsplit("-", 1)[0]


def real_tree_name(kver: str, driver: str) -> str:
    return f"nvidia-{driver}-{kver}"


def build_real_tree(kver: str, out: Path | None = None, *, cache_dir: Path | None = None,
                    refresh: bool = False, jobs: int | None = None) -> Path:
    """The real NVIDIA 535 driver from Debian non-free/contrib, modules compiled for kver.

    Downloads REAL_PACKAGES with apt-get (sources generated from this host's mirrors, in the
    cache dir), unpacks them with dpkg-deb, builds nvidia, nvidia-uvm, nvidia-modeset and
    nvidia-drm with NVIDIA's Makefile against kver's headers (a few minutes), strips their
    debug info and assembles lib64/, bin/, lib/firmware/nvidia/<driver>/, lib/modules/<kver>/.
    No manifest.json: packaging/build-driver-image writes it at push time.

    Cached under cache_dir (default <cache root>/real-<kver>) with the package versions it
    was built from: a later call returns the cached tree at once, without the network,
    unless refresh=True, which asks apt for the current versions and rebuilds if any changed.
    Returns out/nvidia-<driver>-<kver> (hardlinked from the cache; treat it as read-only)
    or, when out is None, the cached tree itself.
    """
    cache = Path(cache_dir) if cache_dir else default_cache_root() / f"real-{kver}"
    with _locked(cache):
        key_file = cache / "key.json"
        key = json.loads(key_file.read_text()) if key_file.is_file() else None
        if key is not None and (cache / "tree").is_dir() and key.get("kernel") == kver and not refresh:
            pass
        else:
            apt = _Apt(cache / "apt")
            apt.update()
            pins = apt.candidate_versions(REAL_PACKAGES)
            wanted = {"kernel": kver, "packages": pins, "excluded_modules": list(REAL_EXCLUDED_MODULES)}
            if key is None or {k: key.get(k) for k in wanted} != wanted or not (cache / "tree").is_dir():
                key = _build_real(kver, cache, apt, pins, jobs or max(2, os.cpu_count() or 2))
        tree = cache / "tree"
        if out is None:
            return tree
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        dest = out / real_tree_name(kver, str(key["driver"]))
        _copy_tree(tree, dest, hardlink=True)
        return dest


def _build_real(kver: str, cache: Path, apt: _Apt, pins: dict[str, str], jobs: int) -> dict[str, object]:
    started = time.monotonic()
    for stale in cache.glob("vm-real-*"):  # left by an interrupted build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    debs_dir = cache / "debs"
    if debs_dir.exists():
        shutil.rmtree(debs_dir)
    debs = apt.download(pins, debs_dir)
    driver = _upstream(pins["libnvidia-ml1"])
    with tempfile.TemporaryDirectory(prefix="vm-real-", dir=cache) as tmp:
        work = Path(tmp)
        root = work / "root"
        for deb in debs:
            _run(["dpkg-deb", "-x", deb, root])
        # The kernel sources: usr/src/nvidia-kernel.tar.xz -> modules/nvidia-kernel/.
        tarballs = sorted((root / "usr" / "src").glob("nvidia-kernel*.tar.xz"))
        if not tarballs:
            raise BuildError("nvidia-kernel-source has no usr/src/nvidia-kernel*.tar.xz")
        src_root = work / "src"
        src_root.mkdir()
        _run(["tar", "-xJf", tarballs[0], "-C", src_root], timeout=KBUILD_TIMEOUT_S)
        makefiles = sorted(src_root.rglob("Kbuild"))
        if not makefiles:
            raise BuildError("no Kbuild in the NVIDIA kernel sources")
        src = makefiles[0].parent
        compile_started = time.monotonic()
        _run(["make", "-C", src, f"-j{jobs}", f"KERNEL_UNAME={kver}",
              f"SYSSRC={headers_common_dir(kver)}", f"SYSOUT={headers_dir(kver)}",
              f"NV_EXCLUDE_KERNEL_MODULES={' '.join(REAL_EXCLUDED_MODULES)}", "modules"],
             timeout=REAL_BUILD_TIMEOUT_S)
        compile_s = time.monotonic() - compile_started

        staged = work / "tree"
        module_dir = staged / "lib" / "modules" / kver
        module_dir.mkdir(parents=True)
        kos = sorted(src.glob("*.ko"))
        if {ko.stem for ko in kos} != set(LOADABLE_MODULES):
            raise BuildError(f"unexpected module set from the NVIDIA build: {[ko.name for ko in kos]}")
        for ko in kos:
            dest = module_dir / ko.name
            shutil.copyfile(ko, dest)
            _run(["strip", "--strip-debug", dest])
            dest.chmod(0o644)

        lib64 = staged / "lib64"
        lib64.mkdir()
        multiarch = root / "usr" / "lib" / "x86_64-linux-gnu"
        for lib_dir in (multiarch / "nvidia" / "current", multiarch):
            for item in sorted(lib_dir.glob("lib*.so*")):
                dest = lib64 / item.name
                if dest.exists() or dest.is_symlink():
                    continue
                if item.is_symlink():
                    target = os.readlink(item)
                    if "/" in target:
                        raise BuildError(f"{item}: symlink {target} leaves its directory")
                    dest.symlink_to(target)
                elif item.is_file():
                    shutil.copyfile(item, dest)
                    dest.chmod(0o755)
        # Debian ships only .so.1 for some libraries; the tree gets the unversioned dev links
        # of the ones programs link against.
        for stem in ("libcuda.so", "libnvidia-ml.so"):
            if not (lib64 / stem).exists() and (lib64 / f"{stem}.1").exists():
                (lib64 / stem).symlink_to(f"{stem}.1")

        bin_dir = staged / "bin"
        bin_dir.mkdir()
        programs = {
            "nvidia-smi": root / "usr" / "lib" / "nvidia" / "current" / "nvidia-smi",
            "nvidia-persistenced": root / "usr" / "bin" / "nvidia-persistenced",
            "nvidia-modprobe": root / "usr" / "bin" / "nvidia-modprobe",
        }
        for name, path in programs.items():
            if not path.is_file():
                raise BuildError(f"{name} not found at {path.relative_to(root)}")
            shutil.copyfile(path, bin_dir / name)
            # Debian's nvidia-modprobe is setuid root; the image contract refuses special bits.
            (bin_dir / name).chmod(0o755)

        firmware = root / "lib" / "firmware" / "nvidia" / driver
        if firmware.is_dir():
            fw_dest = staged / "lib" / "firmware" / "nvidia" / driver
            fw_dest.mkdir(parents=True)
            for blob in sorted(firmware.glob("*.bin")):
                shutil.copyfile(blob, fw_dest / blob.name)
                (fw_dest / blob.name).chmod(0o644)

        tree = cache / "tree"
        if tree.exists():
            shutil.rmtree(tree)
        staged.rename(tree)
    key: dict[str, object] = {
        "kernel": kver,
        "driver": driver,
        "packages": pins,
        "excluded_modules": list(REAL_EXCLUDED_MODULES),
        "build_seconds": round(time.monotonic() - started, 1),
        "compile_seconds": round(compile_s, 1),
        "jobs": jobs,
    }
    (cache / "key.json").write_text(json.dumps(key, indent=2) + "\n")
    shutil.rmtree(debs_dir, ignore_errors=True)
    return key


# ---------------------------------------------------------------- pushing


def tree_kernel(tree: Path) -> str:
    """The kernel release a tree was built for: its only lib/modules/<kernel>/ directory."""
    kernels = [d.name for d in (Path(tree) / "lib" / "modules").iterdir() if d.is_dir()]
    if len(kernels) != 1:
        raise BuildError(f"{tree}: expected one lib/modules/<kernel>/, found {kernels}")
    return kernels[0]


def tree_driver(tree: Path) -> str:
    """The driver version of a tree: the <version> of its regular lib64/libnvidia-ml.so.<version>."""
    pattern = re.compile(r"^libnvidia-ml\.so\.(\d+\.\d+(?:\.\d+)?)$")
    for item in sorted((Path(tree) / "lib64").iterdir()):
        match = pattern.match(item.name)
        if match and item.is_file() and not item.is_symlink():
            return match.group(1)
    raise BuildError(f"{tree}: no lib64/libnvidia-ml.so.<version> to read the driver version from")


def image_tag(driver: str, kernel: str) -> str:
    """The agent's default tag ({driver}-{os}) for a Debian 12 host running kernel."""
    return f"{driver}-{OS_ID}-{OS_VERSION}-{kernel}"


def push_trees(registry_host: str, *trees: Path, fmt: str = "oci") -> dict[str, str]:
    """Push each tree as <registry_host>/nvidia/driver:<driver>-debian-12-<kernel> with
    packaging/build-driver-image (plain HTTP); return {image reference: manifest digest}."""
    pushed = {}
    for tree in trees:
        driver, kernel = tree_driver(tree), tree_kernel(tree)
        ref = f"{registry_host}/{REPOSITORY}:{image_tag(driver, kernel)}"
        with tempfile.TemporaryDirectory(prefix="vm-push-") as tmp:
            digestfile = Path(tmp) / "digest"
            _run([sys.executable, BUILD_SCRIPT, "--driver-version", driver, "--os-id", OS_ID,
                  "--os-version", OS_VERSION, "--kernel-release", kernel, "--format", fmt,
                  "--dest-tls-verify=false", "--digestfile", digestfile, tree, ref],
                 timeout=REAL_BUILD_TIMEOUT_S)
            pushed[ref] = digestfile.read_text().strip()
    return pushed


# ---------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="build_trees.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("kernels", help="print the kernels trees are built for")
    p = sub.add_parser("loadable", help="build loadable trees (default: every host kernel)")
    p.add_argument("out", type=Path)
    p.add_argument("--kernel", action="append", help="kernel release (repeatable)")
    p.add_argument("--driver", default=DEFAULT_DRIVER)
    p = sub.add_parser("real", help="build the real 535 driver tree (minutes; cached)")
    p.add_argument("out", type=Path)
    p.add_argument("--kernel", help="kernel release (default: the first host kernel)")
    p.add_argument("--cache-dir", type=Path)
    p.add_argument("--refresh", action="store_true", help="ask apt for newer package versions")
    p.add_argument("--jobs", type=int)
    p = sub.add_parser("push", help="push trees to a registry as nvidia/driver:<driver>-debian-12-<kernel>")
    p.add_argument("registry", help="HOST:PORT (plain HTTP)")
    p.add_argument("trees", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "kernels":
            print("\n".join(host_kernels()))
        elif args.cmd == "loadable":
            for kver in args.kernel or host_kernels():
                started = time.monotonic()
                tree = build_loadable_tree(kver, args.out, args.driver)
                print(f"{tree}\t{time.monotonic() - started:.1f}s")
        elif args.cmd == "real":
            started = time.monotonic()
            tree = build_real_tree(args.kernel or host_kernels()[0], args.out, cache_dir=args.cache_dir,
                                   refresh=args.refresh, jobs=args.jobs)
            print(f"{tree}\t{time.monotonic() - started:.1f}s")
        elif args.cmd == "push":
            for ref, digest in push_trees(args.registry, *args.trees).items():
                print(f"{ref}\t{digest}")
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
