"""tests/vm/build_trees.py on this host, no VM: the guest's driver trees build and look right.

This machine's kernel cannot load modules, so these tests prove what can be proven without
loading: the stand-in modules compile against both Debian kernel flavours' headers, kmod's
`modinfo` and binutils read the right vermagic, dependencies, versions and symbols from
them, the agent's own modinfo reader and verifier accept the trees, and the userspace
stand-ins behave like NVIDIA's programs (in a private mount namespace that fakes a loaded
module). Loading them is the QEMU guest's job (tests/vm/harness.py).

The real NVIDIA 535 build takes minutes; it runs only with NVIDIA_AGENT_REAL_DRIVER=1.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

try:
    from tests.vm import build_trees as bt
except ImportError:  # the repository root is not on sys.path; pytest put this directory there
    import build_trees as bt  # type: ignore[no-redef]

from agent import hostfacts, reference
from agent.config import DEFAULT_LIB64_ALLOW, ImageSettings
from agent.errors import KernelMismatch
from agent.install import modinfo
from agent.install import verify as driverimage
from agent.install.unpack import Staging
from support import images
from support.registry import RegistryServer

pytestmark = pytest.mark.integration

DRIVER = bt.DEFAULT_DRIVER
try:
    KERNELS = bt.host_kernels()
except (OSError, bt.BuildError):  # not Debian, or no linux-headers-amd64
    KERNELS = []
TOOL_TIMEOUT_S = 60
REAL_ENV = "NVIDIA_AGENT_REAL_DRIVER"


def _tool(*argv: str | Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=TOOL_TIMEOUT_S,
                          check=check, env=env)


def _modinfo(path: Path, field: str) -> str:
    return _tool("modinfo", "-F", field, path).stdout.strip()


def _symbols(path: Path, *nm_args: str) -> set[tuple[str, str]]:
    """(type, name) pairs from nm."""
    pairs = set()
    for line in _tool("nm", *nm_args, path).stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            pairs.add((parts[-2], parts[-1]))
    return pairs


def _has_drm(kver: str) -> bool:
    config = (bt.headers_dir(kver) / ".config").read_text()
    return "CONFIG_DRM=m" in config


@pytest.fixture(scope="module")
def loadable_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh build cache for this module: the first build really compiles."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, loadable_cache: Path) -> dict[str, Path]:
    """Loadable trees for every host kernel, built from scratch once per module."""
    if len(KERNELS) != 2:
        pytest.skip("needs dpkg and linux-headers-amd64 (Debian)")
    out = tmp_path_factory.mktemp("trees")
    return {kver: bt.build_loadable_tree(kver, out, DRIVER, cache_dir=loadable_cache) for kver in KERNELS}


@pytest.fixture(params=KERNELS)
def kver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_host_kernels_are_the_default_and_cloud_flavours_with_headers() -> None:
    """host_kernels() gives linux-headers-amd64's kernel and its cloud flavour, both with headers."""
    if len(KERNELS) != 2:
        pytest.skip("not a Debian host")
    default, cloud = KERNELS
    assert default.endswith("-amd64") and not default.endswith("-cloud-amd64")
    assert cloud == default.removesuffix("-amd64") + "-cloud-amd64"
    for k in KERNELS:
        assert (bt.headers_dir(k) / "Module.symvers").is_file()
        assert (bt.headers_common_dir(k) / "Makefile").is_file()


def test_loadable_tree_has_the_contract_layout(built: dict[str, Path], kver: str) -> None:
    """The tree holds the four modules for its kernel, libnvidia-ml with .so.1/.so links,
    nvidia-smi and nvidia-persistenced; fake_gpu_pci-<kernel>.ko lies beside it."""
    tree = built[kver]
    assert tree.name == f"nvidia-{DRIVER}-{kver}"
    assert sorted(p.name for p in (tree / "lib" / "modules" / kver).iterdir()) == sorted(
        f"{m}.ko" for m in bt.LOADABLE_MODULES)
    assert [p.name for p in (tree / "lib" / "modules").iterdir()] == [kver]
    lib64 = tree / "lib64"
    assert (lib64 / f"libnvidia-ml.so.{DRIVER}").is_file()
    assert os.readlink(lib64 / "libnvidia-ml.so.1") == f"libnvidia-ml.so.{DRIVER}"
    assert os.readlink(lib64 / "libnvidia-ml.so") == "libnvidia-ml.so.1"
    for prog in ("nvidia-smi", "nvidia-persistenced"):
        assert os.access(tree / "bin" / prog, os.X_OK)
    assert (tree.parent / f"fake_gpu_pci-{kver}.ko").is_file()
    assert bt.tree_driver(tree) == DRIVER and bt.tree_kernel(tree) == kver


def test_modinfo_shows_vermagic_depends_and_version(built: dict[str, Path], kver: str) -> None:
    """kmod's modinfo reads each module's vermagic (this kernel), version (the driver) and
    depends: uvm and modeset on nvidia, drm on modeset and, where the kernel has DRM, drm."""
    module_dir = built[kver] / "lib" / "modules" / kver
    drm = _has_drm(kver)
    expected_depends = {
        "nvidia": set(),
        "nvidia-uvm": {"nvidia"},
        "nvidia-modeset": {"nvidia"},
        "nvidia-drm": {"nvidia-modeset", "drm"} if drm else {"nvidia-modeset"},
    }
    for name, depends in expected_depends.items():
        ko = module_dir / f"{name}.ko"
        assert _modinfo(ko, "vermagic").startswith(kver + " ")
        assert _modinfo(ko, "version") == DRIVER
        assert _modinfo(ko, "name") == name.replace("-", "_")
        assert set(filter(None, _modinfo(ko, "depends").split(","))) == depends
        assert _modinfo(ko, "license") == "GPL"
    parms = _modinfo(module_dir / "nvidia.ko", "parm")
    for parm in ("NVreg_TestParam", "NVreg_DeviceFileMode", "require_gpu", "open_count", "gpu_count"):
        assert parm + ":" in parms
    assert "modeset:" in _modinfo(module_dir / "nvidia-drm.ko", "parm")
    aliases = _modinfo(module_dir / "nvidia.ko", "alias").split()
    assert "pci:v000010DEd*sv*sd*bc03sc02i00*" in aliases  # 3D controller
    assert "pci:v000010DEd*sv*sd*bc03sc00i00*" in aliases  # VGA
    assert "char-major-195-*" in aliases


def test_modules_export_and_import_the_symbols_that_tie_them(built: dict[str, Path], kver: str) -> None:
    """nvidia exports what nvidia-uvm and nvidia-modeset use; nvidia-modeset exports what
    nvidia-drm uses; nvidia-drm imports drm_format_info from drm where the kernel has DRM."""
    module_dir = built[kver] / "lib" / "modules" / kver
    nvidia = _symbols(module_dir / "nvidia.ko")
    for sym in ("nvUvmInterfaceRegisterUvmCallbacks", "nvidia_get_rm_ops"):
        assert ("r", f"__ksymtab_{sym}") in nvidia
        assert ("T", sym) in nvidia
    assert ("U", "__register_chrdev") in nvidia
    assert ("U", "nvUvmInterfaceRegisterUvmCallbacks") in _symbols(module_dir / "nvidia-uvm.ko", "-u")
    assert ("U", "nvidia_get_rm_ops") in _symbols(module_dir / "nvidia-modeset.ko", "-u")
    assert ("r", "__ksymtab_nvKmsKapiGetFunctionsTable") in _symbols(module_dir / "nvidia-modeset.ko")
    drm_undefined = _symbols(module_dir / "nvidia-drm.ko", "-u")
    assert ("U", "nvKmsKapiGetFunctionsTable") in drm_undefined
    assert (("U", "drm_format_info") in drm_undefined) == _has_drm(kver)
    sections = _tool("readelf", "-S", "-W", module_dir / "nvidia.ko").stdout
    assert "__ksymtab_gpl" in sections and ".modinfo" in sections and "__versions" in sections


def test_agent_reads_the_modules_and_orders_them(built: dict[str, Path], kver: str) -> None:
    """agent.install.modinfo reads what kmod reads, and agent.install.verify.load_order puts nvidia
    first, nvidia-modeset before nvidia-drm, nvidia-uvm after nvidia."""
    module_dir = built[kver] / "lib" / "modules" / kver
    infos = {}
    for name in bt.LOADABLE_MODULES:
        info = modinfo.read_modinfo(module_dir / f"{name}.ko")
        assert modinfo.vermagic_matches(info.vermagic, kver)
        assert not modinfo.vermagic_matches(info.vermagic, next(k for k in KERNELS if k != kver))
        assert info.version == DRIVER
        infos[info.name] = info
    assert set(infos["nvidia_drm"].depends) == ({"drm", "nvidia_modeset"} if _has_drm(kver) else {"nvidia_modeset"})
    order = [i.name for i in driverimage.load_order(infos)]
    assert order[0] == "nvidia"
    assert order.index("nvidia_modeset") < order.index("nvidia_drm")
    assert set(order) == {"nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm"}


def test_agent_verifies_the_tree_with_a_generated_manifest(built: dict[str, Path], kver: str,
                                                           tmp_path: Path) -> None:
    """With manifest.json from packaging/build-driver-image --manifest-only, the agent's
    verify_tree accepts the tree for its own kernel and refuses it for the other flavour."""
    tree = tmp_path / "tree"
    shutil.copytree(built[kver], tree, symlinks=True)
    result = images.run_build_script("--manifest-only", "--driver-version", DRIVER, "--os-id", "debian",
                                     "--os-version", "12", "--kernel-release", kver, tree)
    assert result.returncode == 0, result.stderr
    with Staging(tree) as read_back:  # the agent's own reading of a tree: digests, links checked
        extracted = read_back.finish()
    assert set(extracted.files) - {"manifest.json"} == set(json.loads((tree / "manifest.json").read_text())["files"])
    verified = driverimage.verify_tree(tree, extracted, driver_version=DRIVER, kernel=kver,
                                       lib64_allow=DEFAULT_LIB64_ALLOW)
    assert verified.modules[0].name == "nvidia"
    assert sorted(verified.module_paths) == ["nvidia", "nvidia_drm", "nvidia_modeset", "nvidia_uvm"]
    other = next(k for k in KERNELS if k != kver)
    with pytest.raises(KernelMismatch):
        driverimage.verify_tree(tree, extracted, driver_version=DRIVER, kernel=other, lib64_allow=DEFAULT_LIB64_ALLOW)


def test_fake_gpu_pci_builds_for_each_kernel(built: dict[str, Path], kver: str) -> None:
    """fake_gpu_pci-<kernel>.ko is a module for that kernel with a gpus= parameter that
    creates its own PCI root bus (imports pci_scan_root_bus / pci_remove_root_bus)."""
    ko = built[kver].parent / f"fake_gpu_pci-{kver}.ko"
    assert _modinfo(ko, "vermagic").startswith(kver + " ")
    assert _modinfo(ko, "depends") == ""
    assert "gpus:" in _modinfo(ko, "parm")
    undefined = {name for _t, name in _symbols(ko, "-u")}
    assert {"pci_scan_root_bus", "pci_bus_add_devices", "pci_stop_root_bus", "pci_remove_root_bus"} <= undefined


def test_nvidia_smi_links_libnvidia_ml_and_fails_without_the_module(built: dict[str, Path], kver: str) -> None:
    """nvidia-smi's only NVIDIA dependency is NEEDED libnvidia-ml.so.1 (the library's
    soname), found through the dynamic linker; on this host (no nvidia module) it prints
    the real tool's error and exits 9 (NVML_ERROR_DRIVER_NOT_LOADED)."""
    tree = built[kver]
    smi = tree / "bin" / "nvidia-smi"
    dynamic = _tool("readelf", "-d", smi).stdout
    assert "Shared library: [libnvidia-ml.so.1]" in dynamic
    assert "RPATH" not in dynamic and "RUNPATH" not in dynamic
    lib = tree / "lib64" / f"libnvidia-ml.so.{DRIVER}"
    assert "Library soname: [libnvidia-ml.so.1]" in _tool("readelf", "-d", lib).stdout
    exported = {name for t, name in _symbols(lib, "-D", "--defined-only") if t == "T"}
    assert {"nvmlInit_v2", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount_v2"} <= exported

    env = {**os.environ, "LD_LIBRARY_PATH": str(tree / "lib64")}
    result = _tool(smi, env=env, check=False)
    assert result.returncode == 9, result.stdout + result.stderr
    assert "couldn't communicate with the NVIDIA driver" in result.stdout
    no_path = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    result = _tool(smi, env=no_path, check=False)
    assert result.returncode == 127 and "libnvidia-ml.so.1" in result.stderr


SIMULATED_MODULE = """
set -eu
mount -t tmpfs none /sys/module
mkdir -p /sys/module/nvidia
echo "$MODULE_VERSION" > /sys/module/nvidia/version
mount -t tmpfs none /dev
touch /dev/nvidiactl
mount -t tmpfs none /run
"""


def _in_fake_host(tree: Path, script: str, module_version: str) -> subprocess.CompletedProcess[str]:
    """Run script in a private mount namespace whose /sys/module/nvidia/version says
    module_version and whose /dev has an nvidiactl (tmpfs over /sys/module, /dev, /run)."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    env = {**os.environ, "LD_LIBRARY_PATH": str(tree / "lib64"), "MODULE_VERSION": module_version,
           "BIN": str(tree / "bin")}
    return _tool("unshare", "-m", "--propagation", "private", "sh", "-c", SIMULATED_MODULE + script,
                 env=env, check=False)


def test_nvidia_smi_reports_the_loaded_module_version(built: dict[str, Path]) -> None:
    """With a module of the same version 'loaded', nvidia-smi prints Driver Version and exits
    0; with another version it reports the driver/library mismatch and exits 18, as NVIDIA's."""
    tree = built[KERNELS[0]]
    ok = _in_fake_host(tree, '"$BIN/nvidia-smi"', DRIVER)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"Driver Version: {DRIVER}" in ok.stdout
    mismatch = _in_fake_host(tree, '"$BIN/nvidia-smi"', "535.1.01")
    assert mismatch.returncode == 18
    assert "Driver/library version mismatch" in mismatch.stdout


def test_persistenced_stand_in_writes_its_pid_file_and_stops_on_sigterm(built: dict[str, Path]) -> None:
    """nvidia-persistenced forks, writes /run/nvidia-persistenced/nvidia-persistenced.pid,
    holds /dev/nvidiactl open, and on SIGTERM removes the pid file and exits."""
    tree = built[KERNELS[0]]
    script = """
"$BIN/nvidia-persistenced" --user nvidia-persistenced
pid=$(cat /run/nvidia-persistenced/nvidia-persistenced.pid)
echo "pid=$pid"
ls -l /proc/$pid/fd | grep -q /dev/nvidiactl && echo holds-ctl
kill -TERM "$pid"
for _ in $(seq 50); do [ -e /run/nvidia-persistenced/nvidia-persistenced.pid ] || break; sleep 0.1; done
[ -e /run/nvidia-persistenced/nvidia-persistenced.pid ] && echo pidfile-left || echo pidfile-gone
"""
    result = _in_fake_host(tree, script, DRIVER)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "holds-ctl" in result.stdout and "pidfile-gone" in result.stdout
    # Without /dev/nvidiactl it refuses to start.
    alone = _tool(tree / "bin" / "nvidia-persistenced", "--foreground", check=False)
    assert alone.returncode == 1 and "nvidiactl" in alone.stderr


def test_loadable_build_is_cached(built: dict[str, Path], loadable_cache: Path, tmp_path: Path) -> None:
    """A second build for the same kernel, driver and sources comes from the cache (no
    compile, a copy) with identical bytes, as a separate copy the caller may change."""
    kver = KERNELS[0]
    started = time.monotonic()
    again = bt.build_loadable_tree(kver, tmp_path / "again", DRIVER, cache_dir=loadable_cache)
    assert time.monotonic() - started < 5
    rel = Path("lib") / "modules" / kver / "nvidia.ko"
    assert (again / rel).read_bytes() == (built[kver] / rel).read_bytes()
    assert (again / rel).stat().st_ino != (built[kver] / rel).stat().st_ino
    assert (tmp_path / "again" / f"fake_gpu_pci-{kver}.ko").is_file()


def test_image_tag_is_the_agents_default_for_a_debian_12_host(kver: str) -> None:
    """image_tag matches the agent's default tag template with the OS key of a Debian 12 host."""
    os_ = hostfacts.os_info({"ID": "debian", "VERSION_ID": "12"})
    expected = reference.render_tag(ImageSettings().tag_template,
                                    {"driver": DRIVER, "os": hostfacts.os_key(os_, kver)})
    assert bt.image_tag(DRIVER, kver) == expected
    assert expected == f"{DRIVER}-debian-12-{kver}"
    assert ImageSettings().repository == bt.REPOSITORY


def test_push_trees_pushes_each_tree_under_its_tag(built: dict[str, Path], registry_server: RegistryServer) -> None:
    """push_trees builds each tree into an image with packaging/build-driver-image and pushes
    it as nvidia/driver:<driver>-debian-12-<kernel>; the image's manifest.json names the kernel."""
    pushed = bt.push_trees(registry_server.host, *built.values())
    assert sorted(pushed) == sorted(f"{registry_server.host}/nvidia/driver:{bt.image_tag(DRIVER, k)}"
                                    for k in KERNELS)
    for kver in KERNELS:
        _media_type, body = images.get_manifest(registry_server.host, bt.REPOSITORY, bt.image_tag(DRIVER, kver))
        layer_desc = json.loads(body)["layers"][0]
        files = images.layer_files(images.get_blob(registry_server.host, bt.REPOSITORY, layer_desc["digest"]))
        manifest = json.loads(files["nvidia-driver/manifest.json"])
        assert manifest["kernel_release"] == kver and manifest["driver_version"] == DRIVER
        assert len(manifest["modules"]) == 4


@pytest.mark.timeout(3600)
@pytest.mark.skipif(os.environ.get(REAL_ENV) != "1",
                    reason=f"builds NVIDIA's 535 driver from Debian non-free (minutes, ~100 MB download); "
                    f"set {REAL_ENV}=1")
def test_real_driver_tree_builds_and_is_cached(tmp_path: Path) -> None:
    """The real driver from Debian's non-free/contrib packages compiles for the default
    kernel (real vermagic and dependencies), its nvidia-smi exits 9 here, nothing in the
    tree is setuid (nvidia-modprobe is in Debian), and a second call returns at once."""
    kver = KERNELS[0]
    tree = bt.build_real_tree(kver, tmp_path / "real")
    driver = bt.tree_driver(tree)
    assert tree.name == f"nvidia-{driver}-{kver}" and driver.startswith("535.")
    module_dir = tree / "lib" / "modules" / kver
    assert sorted(p.name for p in module_dir.iterdir()) == sorted(f"{m}.ko" for m in bt.LOADABLE_MODULES)
    infos = {}
    for name in bt.LOADABLE_MODULES:
        info = modinfo.read_modinfo(module_dir / f"{name}.ko")
        assert modinfo.vermagic_matches(info.vermagic, kver) and info.version == driver
        infos[info.name] = info
    assert "nvidia_modeset" in infos["nvidia_drm"].depends and "nvidia" in infos["nvidia_uvm"].depends
    assert driverimage.load_order(infos)[0].name == "nvidia"
    assert any((tree / "lib" / "firmware" / "nvidia" / driver).glob("gsp_*.bin"))
    for path in tree.rglob("*"):
        if not path.is_symlink():
            assert not path.stat().st_mode & 0o7000, path
    env = {**os.environ, "LD_LIBRARY_PATH": str(tree / "lib64")}
    assert _tool(tree / "bin" / "nvidia-smi", env=env, check=False).returncode == 9
    started = time.monotonic()
    assert bt.build_real_tree(kver, tmp_path / "again") == tmp_path / "again" / tree.name
    assert time.monotonic() - started < 30
