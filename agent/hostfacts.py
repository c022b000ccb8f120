"""Detect: what the host is running (OS, kernel, NVIDIA GPUs, loaded modules, mounts). Parsers are pure."""

from __future__ import annotations

import os
import platform
import re
import shlex
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from agent.errors import HostError
from agent.hostroot import HostRoot

NVIDIA_PCI_VENDOR = 0x10DE
# PCI class/subclass (the top 16 bits of the 24-bit class code).
GPU_PCI_CLASSES = {0x0300: "VGA compatible controller", 0x0302: "3D controller"}
COREOS_IDS = frozenset({"flatcar", "coreos", "rhcos", "scos"})
_OS_KEY_PART = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class OSInfo:
    id: str
    version: str
    pretty_name: str
    coreos_family: bool  # image-based, updated whole (Flatcar, Fedora/RHEL CoreOS); the kernel may still vary


PASSTHROUGH_DRIVERS = frozenset({"vfio-pci", "pci-stub"})  # a GPU bound to these belongs to a VM, not the host


@dataclass(frozen=True)
class GPU:
    pci_slot: str
    device_id: int
    pci_class: int
    driver: str | None = None  # the kernel driver bound to it, if any

    @property
    def kind(self) -> str:
        return GPU_PCI_CLASSES.get(self.pci_class >> 8, "unknown")


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fs_type: str
    source: str
    options: dict[str, str]
    mount_id: int = 0  # mountinfo's first two fields: what is stacked on, or mounted inside, what
    parent_id: int = 0


@dataclass(frozen=True)
class HostFacts:
    os: OSInfo
    kernel: str
    arch: str
    gpus: tuple[GPU, ...]  # the host's own: GPUs passed through to VMs (vfio-pci) are not counted
    modules: dict[str, str]  # loaded module name -> version ("" when it has none)
    mounts: tuple[Mount, ...]
    modules_supported: bool
    lib_dir: str = "/usr/lib64"  # mount.target with its symlinks resolved (what mountinfo shows)
    passthrough: tuple[GPU, ...] = ()

    @property
    def lib_mount(self) -> Mount | None:
        """The mount whose files show at the library directory the overlay goes onto, if it is
        mounted there (None when the directory shows a mount of one of its ancestors)."""
        seen = visible_mount(self.mounts, self.lib_dir)
        return seen if seen is not None and seen.mount_point == self.lib_dir else None


def _covers(mount_point: str, path: str) -> bool:
    return path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def visible_mount(mounts: tuple[Mount, ...], path: str) -> Mount | None:
    """The mount whose files a lookup of `path` reaches: the one that covers it last.

    A path is resolved from the root down. At each mount, the next one is the child (by
    mountinfo's parent id) mounted at the shortest ancestor of `path` (a mount stacked on the
    same point is a child of the one beneath it). So a mount on `/usr` made after one on
    `/usr/lib64` (systemd-sysext's merge) hides it: the older mount stays listed, its parent
    is no longer on the way. Mounts whose parent is not listed (outside a host root) are
    where the walk starts.
    """
    ids = {m.mount_id for m in mounts}
    children: dict[int | None, list[Mount]] = {}
    for m in mounts:
        parent = m.parent_id if m.parent_id in ids and m.parent_id != m.mount_id else None
        children.setdefault(parent, []).append(m)
    here: Mount | None = None
    walked: set[int] = set()
    while True:
        ways = [m for m in children.get(here.mount_id if here else None, ()) if m.mount_id not in walked
                and _covers(m.mount_point, path)]
        if not ways:
            return here
        shortest = min(len(m.mount_point) for m in ways)
        here = [m for m in ways if len(m.mount_point) == shortest][-1]  # the later of twins
        walked.add(here.mount_id)


def parse_os_release(text: str) -> dict[str, str]:
    """os-release(5): KEY=value lines, shell-style quoting, comments."""
    fields: dict[str, str] = {}
    for raw_line in text.splitlines():
        line = raw_line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        try:
            parts = shlex.split(raw, posix=True)
        except ValueError:
            continue
        fields[key.strip()] = parts[0] if parts else ""
    return fields


def os_info(fields: dict[str, str]) -> OSInfo:
    """The OS identity the agent keys installs on.

    Fedora CoreOS is ID=fedora with VARIANT_ID=coreos (RHEL CoreOS 10 is
    ID=rhel likewise); they carry the full build in OSTREE_VERSION, where
    VERSION_ID is only the major release.
    """
    os_id = fields.get("ID", "linux").lower()
    variant_coreos = fields.get("VARIANT_ID") == "coreos"
    if variant_coreos and os_id not in COREOS_IDS:
        os_id = f"{os_id}-coreos"
    version = fields.get("OSTREE_VERSION") or fields.get("VERSION_ID") or fields.get("BUILD_ID") or "unknown"
    return OSInfo(id=os_id, version=version, pretty_name=fields.get("PRETTY_NAME", os_id),
                  coreos_family=variant_coreos or os_id in COREOS_IDS)


def os_key(os_: OSInfo, kernel: str) -> str:
    """The `<os>` of /opt/nvidia/<driver>/<os>: `<os_id>-<os_version>-<kernel>`, on every OS.

    A tree is right only for the kernel it was built for, and no OS version pins the kernel:
    RHCOS real-time and 64k-page kernels and `rpm-ostree override replace` change it under
    the same OS version.
    """
    return "-".join(_OS_KEY_PART.sub("_", p) for p in (os_.id, os_.version, kernel))


def parse_mountinfo(text: str) -> tuple[Mount, ...]:
    """proc_pid_mountinfo(5), with octal escapes (\\040) decoded."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        lf, rf = left.split(), right.split()
        if len(lf) < 6 or len(rf) < 3:
            continue
        options: dict[str, str] = {}
        for opt in (lf[5] + "," + rf[2]).split(","):
            k, _, v = opt.partition("=")
            options[k] = _unescape(v)
        if not (lf[0].isdigit() and lf[1].isdigit()):
            continue
        mounts.append(Mount(_unescape(lf[4]), rf[0], _unescape(rf[1]), options, int(lf[0]), int(lf[1])))
    return tuple(mounts)


def read_mountinfo(path: Path = Path("/proc/self/mountinfo")) -> str:
    """mountinfo as text: paths are bytes (only space, tab, newline and backslash are escaped), so
    a mount point that is not UTF-8 keeps its bytes as surrogates instead of failing the read."""
    return os.fsdecode(path.read_bytes())


def host_view_mounts(mounts: tuple[Mount, ...], host: HostRoot) -> tuple[Mount, ...]:
    """Keep mounts under the host root and rename their paths to host paths."""
    def view(path: str) -> str | None:
        try:
            return host.host_view(Path(path))
        except ValueError:
            return None

    out = []
    for m in mounts:
        point = view(m.mount_point)
        if point is None:
            continue
        options = dict(m.options)
        if "lowerdir" in options:
            options["lowerdir"] = ":".join(view(p) or p for p in options["lowerdir"].split(":"))
        out.append(Mount(point, m.fs_type, m.source, options, m.mount_id, m.parent_id))
    return tuple(out)


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def oci_arch(machine: str) -> str:
    return {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64", "ppc64le": "ppc64le",
            "s390x": "s390x"}.get(machine, machine)


class UdevContext(Protocol):
    def list_devices(self, **kwargs: Any) -> Iterable[Any]: ...


def find_gpus(context: UdevContext) -> tuple[GPU, ...]:
    """NVIDIA GPUs on the PCI bus: vendor 0x10de and class 0x0300 (VGA) or 0x0302 (3D), with their driver."""
    gpus = []
    for dev in context.list_devices(subsystem="pci"):
        try:
            vendor = int(_attr(dev, "vendor"), 16)
            pci_class = int(_attr(dev, "class"), 16)
            device_id = int(_attr(dev, "device"), 16)
        except (KeyError, ValueError):
            continue
        if vendor == NVIDIA_PCI_VENDOR and (pci_class >> 8) in GPU_PCI_CLASSES:
            driver = getattr(dev, "driver", None)
            gpus.append(GPU(pci_slot=dev.sys_name, device_id=device_id, pci_class=pci_class,
                            driver=str(driver) if driver else None))
    return tuple(sorted(gpus, key=lambda g: g.pci_slot))


def _attr(dev: Any, name: str) -> str:
    value = dev.attributes.get(name)
    if value is None:
        raise KeyError(name)
    return value.decode() if isinstance(value, bytes) else str(value)


def read_modules(sys_module: Path) -> dict[str, str]:
    """Loaded modules with their versions, from /sys/module/<name>/version."""
    loaded: dict[str, str] = {}
    if not sys_module.is_dir():
        return loaded
    for entry in sys_module.iterdir():
        # Built-in modules appear in /sys/module too but have no initstate.
        if not (entry / "initstate").exists():
            continue
        try:
            loaded[entry.name] = (entry / "version").read_text().strip()
        except OSError:
            loaded[entry.name] = ""
    return loaded


class HostProbe:
    """Reads the host's facts off the host root; the udev context is injected."""

    def __init__(self, host: HostRoot, udev: UdevContext | None = None) -> None:
        self.host = host
        self._udev = udev

    def kernel(self) -> str:
        path = self.host("/proc/sys/kernel/osrelease")
        try:
            return path.read_text().strip()
        except OSError:
            if self.host.root == Path("/"):
                return os.uname().release
            raise HostError(f"cannot read the kernel release from {path}") from None

    def os(self) -> OSInfo:
        for candidate in ("/etc/os-release", "/usr/lib/os-release"):
            path = self.host(candidate)
            if path.is_file():
                return os_info(parse_os_release(path.read_text(errors="replace")))
        raise HostError(f"no os-release under {self.host.root} (looked for /etc/os-release, /usr/lib/os-release)")

    def gpus(self) -> tuple[GPU, ...]:
        if self._udev is None:
            import pyudev  # noqa: PLC0415 - libudev is only needed on a real host

            self._udev = pyudev.Context()
        return find_gpus(self._udev)

    def mounts(self) -> tuple[Mount, ...]:
        """Mounts under the host root, named as the host sees them (lowerdir paths too).

        Our own mount namespace is the one we act in, whatever the host root.
        """
        return host_view_mounts(parse_mountinfo(read_mountinfo()), self.host)

    def facts(self, lib_dir: str = "/usr/lib64") -> HostFacts:
        """What the host runs; `lib_dir` (mount.target) is resolved through its symlinks."""
        proc_modules = self.host("/proc/modules")
        gpus = self.gpus()
        return HostFacts(
            os=self.os(),
            kernel=self.kernel(),
            arch=oci_arch(platform.machine()),
            gpus=tuple(g for g in gpus if g.driver not in PASSTHROUGH_DRIVERS),
            modules=read_modules(self.host("/sys/module")),
            mounts=self.mounts(),
            modules_supported=proc_modules.exists(),
            lib_dir=self.host.resolve(lib_dir),
            passthrough=tuple(g for g in gpus if g.driver in PASSTHROUGH_DRIVERS),
        )
