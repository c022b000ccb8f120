"""The system extension (packaging/build-sysext): its layout, a runtime that needs no host Python,
and the frozen agent doing the main job on a sandboxed host whose every python3 is hidden.

The build (PyInstaller, then mksquashfs) runs once per session, ~1-2 min on 2 cores.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_units_bus import systemd_bus  # noqa: F401 - the fixture: a private system bus with systemd on it

from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, REPO_ROOT, Host, RunningAgent, push_driver, tree_path, write
from tests.vm import harness

pytestmark = pytest.mark.integration
NAME = "nvidia-agent"
# What the runtime may take from the host: glibc's libraries and libudev (every systemd host has both).
HOST_LIBS = {"libc.so.6", "libm.so.6", "libpthread.so.0", "libdl.so.2", "librt.so.1", "libutil.so.1",
             "ld-linux-x86-64.so.2", "libudev.so.1"}
SIZE_BUDGET_MIB = 40
# What a running frozen agent may map from outside the extension: glibc, libudev, the C locale
# data, devices, and umockdev's preload library (the test's fake /sys; it needs only libc).
HOST_FILES = re.compile(r"^/dev/|^/usr/lib/locale/|.*/gconv/|.*/(?:lib(?:c|m|pthread|dl|rt|util)\.so\.\d+|"
                        r"ld-linux-x86-64\.so\.2|libudev\.so\.1[.\d]*|libumockdev-preload\.so[.\d]*)$")


def mapped_files(pid: int) -> set[str]:
    """The files a process has mapped (/proc/<pid>/maps)."""
    paths = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            paths.add(fields[5].removesuffix(" (deleted)"))
    return paths


class Built:
    def __init__(self, image: Path, tree: Path) -> None:
        self.image, self.tree = image, tree
        self.exe = tree / "usr/lib" / NAME / NAME


@pytest.fixture(scope="module")
def sysext() -> Built:
    for tool in ("mksquashfs", "unsquashfs", "readelf"):
        assert shutil.which(tool), f"{tool} missing: .ci/setup installs squashfs-tools and binutils"
    # packaging/build-sysext, run once for this tier and the VM tier (cached by what goes into it)
    image = harness.agent_sysext()
    version = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert image.name == f"{NAME}-{version}-x86-64.raw", image
    assert (image.parent / "tree/usr/bin" / NAME).is_symlink(), "the build keeps the tree it packed"
    return Built(image, image.parent / "tree")


def test_the_image_holds_the_agent_its_unit_and_an_any_os_release(sysext: Built, tmp_path: Path,
                                                                 record_property: pytest.RecordProperty) -> None:
    """What systemd-sysext merges, read back from the squashfs itself (not the staging tree)."""
    unpacked = tmp_path / "unpacked"
    subprocess.run(["unsquashfs", "-q", "-n", "-d", str(unpacked), str(sysext.image)], check=True,
                   stdout=subprocess.DEVNULL)
    assert sorted(p.name for p in unpacked.iterdir()) == ["usr"]  # only /usr is merged
    usr = unpacked / "usr"
    assert os.readlink(usr / "bin" / NAME) == f"../lib/{NAME}/{NAME}"
    assert os.access(usr / "lib" / NAME / NAME, os.X_OK)
    release = (usr / f"lib/extension-release.d/extension-release.{NAME}").read_text().splitlines()
    assert "ID=_any" in release and "ARCHITECTURE=x86-64" in release
    unit = (usr / "lib/systemd/system/nvidia-agent.service").read_text()
    assert f"ExecStart=/usr/bin/{NAME} daemon" in unit
    dropin = (usr / "lib/systemd/system/multi-user.target.d/10-nvidia-agent.conf").read_text().splitlines()
    assert {"Wants=nvidia-agent.service", "Upholds=nvidia-agent.service"} <= set(dropin), dropin
    assert (usr / f"lib/{NAME}/config.d/00-defaults.toml").read_bytes() == \
        (REPO_ROOT / "etc/nvidia-agent/00-defaults.toml").read_bytes()
    assert (usr / f"share/doc/{NAME}/README.md").is_file()
    assert not [p for p in unpacked.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o022], \
        "nothing in /usr may be group- or world-writable"
    size_mib = sysext.image.stat().st_size / 2**20
    record_property("sysext_mib", round(size_mib, 1))
    print(f"\n{sysext.image.name}: {size_mib:.1f} MiB")
    assert size_mib <= SIZE_BUDGET_MIB, f"{size_mib:.1f} MiB, budget {SIZE_BUDGET_MIB} MiB"


def elf_needed(path: Path) -> list[str] | None:
    with path.open("rb") as f:
        if f.read(4) != b"\x7fELF":
            return None
    out = subprocess.run(["readelf", "-d", "-W", str(path)], capture_output=True, text=True, check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def test_the_runtime_takes_only_glibc_and_libudev_from_the_host(sysext: Built) -> None:
    """Every library an ELF file of the runtime needs is in the runtime, or glibc's, or libudev."""
    runtime = sysext.tree / "usr/lib" / NAME
    files = [p for p in runtime.rglob("*") if p.is_file() and not p.is_symlink()]
    bundled = {p.name for p in runtime.rglob("*")}
    foreign = {}
    for path in files:
        needed = elf_needed(path)
        for lib in needed or ():
            if lib not in bundled and lib not in HOST_LIBS:
                foreign.setdefault(lib, []).append(str(path.relative_to(runtime)))
    assert any(elf_needed(p) is not None for p in files)
    assert not foreign, f"needed from the host, beyond glibc and libudev: {foreign}"


@pytest.fixture
def pythonless(host: Host) -> Iterator[Host]:
    """The host's namespace with every python3 executable on this machine covered by /dev/null."""
    hidden = set()
    for folder in ("/usr/bin", "/usr/local/bin", "/bin", str(Path(sys.executable).parent)):
        for exe in Path(folder).glob("python3*"):
            real = exe.resolve()
            if real.is_file() and real not in hidden:
                host.in_ns("mount", "--bind", "/dev/null", str(real))
                hidden.add(real)
    assert hidden
    assert subprocess.run(["nsenter", f"--mount={host.ns_dir / 'mnt'}", "--", "python3", "-c", "1"],
                          capture_output=True, check=False).returncode != 0
    yield host


def test_the_frozen_agent_does_the_main_job_without_a_python(tmp_path: Path, registry: RegistryServer,
                                                             pythonless: Host, sysext: Built,
                                                             systemd_bus: object) -> None:  # noqa: F811
    """Pull, verify, install, overlay, reload systemd over D-Bus (pydbus and GLib from the runtime) and
    report, with the extension's binary in a namespace where no python3 runs: the runtime is its own."""
    push_driver(tmp_path, registry.host, K1)
    pythonless.command = [str(sysext.exe)]
    # host programs must get the caller's library path, not the bundle's (PyInstaller puts it first)
    record = tmp_path / "mount-env"
    wrappers = write(tmp_path / "wrappers/mount", f'#!/bin/sh\necho "${{LD_LIBRARY_PATH-unset}}" >> {record}\n'
                                                  'exec /usr/bin/mount "$@"\n').parent
    (wrappers / "mount").chmod(0o755)
    first = pythonless.once(env={"PATH": f"{wrappers}:/usr/sbin:/usr/bin:/sbin:/bin"})
    assert first.returncode == 0, first.stdout + first.stderr
    seen = record.read_text().splitlines()
    assert seen and not [line for line in seen if str(sysext.tree) in line], seen
    assert "units_not_reloaded" not in first.stdout, first.stdout
    assert "Reload" in [call[1] for call in systemd_bus.GetCalls()]  # type: ignore[attr-defined]
    assert pythonless.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
    assert f"libcuda.so.{DRIVER}" in pythonless.in_ns("ls", str(pythonless.root / "usr/lib64")).split()
    for dropins in (pythonless.root / "etc/systemd/system").glob("*.d"):
        shutil.rmtree(dropins)  # the daemon writes them again and reloads systemd: GLib and Gio get loaded
    with RunningAgent(pythonless) as agent:
        status = agent.status_json(wait_s=60)
        maps = mapped_files(int((pythonless.root / "run/nvidia-agent/agent.lock").read_text()))
        code, log = agent.stop()
    assert status["phase"] == "ready" and status["current"] == tree_path(K1), status
    assert code == 0, log
    # what the running agent really loaded (dlopen, typelibs' libraries, ctypes), not only ELF NEEDED
    assert any(Path(path).name.startswith("libgio-2.0") for path in maps), sorted(maps)
    from_host = sorted(path for path in maps if not path.startswith(f"{sysext.tree}/") and not HOST_FILES.match(path))
    assert not from_host, from_host
    helped = subprocess.run([str(sysext.exe), "--help"], capture_output=True, text=True, check=False, env={})
    assert helped.returncode == 0 and "daemon" in helped.stdout, helped.stderr
