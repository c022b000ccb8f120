"""Device nodes: /dev/nvidiactl, /dev/nvidia<N>, -modeset, -uvm, -uvm-tools, with majors from /proc/devices."""

from __future__ import annotations

import contextlib
import os
import re
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from agent.errors import HostError

NVIDIA_MAJOR_NAMES = ("nvidia", "nvidia-frontend")  # the name the driver registers major 195 under
NVIDIA_CTL_MINOR = 255
NVIDIA_MODESET_MINOR = 254
DEVICE_MODE = 0o666  # the driver's default NVreg_DeviceFileMode
POLL_SLICE_S = 1.0  # the bind wait looks at the stop request at least this often


@dataclass(frozen=True)
class Ownership:
    """Who owns the device nodes: the driver's DeviceFileUID/GID/Mode, and whether to touch them at all."""

    uid: int = 0
    gid: int = 0
    mode: int = DEVICE_MODE
    modify: bool = True  # NVreg_ModifyDeviceFiles: 0 leaves the nodes to someone else


@dataclass(frozen=True)
class Node:
    path: str  # relative to /dev
    major: int
    minor: int
    mode: int = DEVICE_MODE
    uid: int = 0
    gid: int = 0


def char_majors(proc_devices: str) -> dict[str, int]:
    """The character-device section of /proc/devices: name -> major."""
    majors: dict[str, int] = {}
    in_char = False
    for line in proc_devices.splitlines():
        if line.strip() == "Character devices:":
            in_char = True
            continue
        if line.strip().endswith("devices:"):
            in_char = False
            continue
        parts = line.split()
        if in_char and len(parts) == 2 and parts[0].isdigit():
            majors.setdefault(parts[1], int(parts[0]))
    return majors


def parse_fields(text: str) -> dict[str, str]:
    """`Name: value` lines, as /proc/driver/nvidia/params and gpus/<slot>/information print them."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields.setdefault(key.strip(), value.strip())
    return fields


def gpu_minor(information: str) -> int | None:
    """The `Device Minor:` of /proc/driver/nvidia/gpus/<slot>/information (the N of /dev/nvidia<N>);
    None for a GPU the driver excludes (`GPU Excluded: Yes`) or a file without the field."""
    fields = parse_fields(information)
    value = fields.get("Device Minor", "")
    if fields.get("GPU Excluded") == "Yes" or not value.isdigit():
        return None
    return int(value)


def ownership(params: str | None, configured: tuple[str, ...] = ()) -> Ownership:
    """The owner and mode of the driver's nodes, as nvidia-modprobe decides them: what the loaded
    driver reports in /proc/driver/nvidia/params (decimal), else the NVreg_DeviceFile* parameters
    the agent loads it with (any base, as the kernel reads module parameters), else root and 0666."""
    values: dict[str, int] = {}
    for item in configured:  # "NVreg_DeviceFileMode=0660"
        key, _, value = item.partition("=")
        number = _kernel_uint(value)
        if number is not None:
            values[key.removeprefix("NVreg_")] = number
    for key, value in parse_fields(params or "").items():
        if value.isdigit():
            values[key] = int(value)
    default = Ownership()
    return Ownership(uid=values.get("DeviceFileUID", default.uid), gid=values.get("DeviceFileGID", default.gid),
                     mode=values.get("DeviceFileMode", default.mode) & 0o777,
                     modify=values.get("ModifyDeviceFiles", 1) != 0)


def _kernel_uint(text: str) -> int | None:
    """A module parameter as the kernel's kstrtouint(base 0) reads it: 0x.. hex, 0.. octal, else decimal."""
    text = text.strip().lower()
    base = 16 if text.startswith("0x") else 8 if text.startswith("0") and len(text) > 1 else 10
    try:
        return int(text, base)
    except ValueError:
        return None


def plan_nodes(proc_devices: str, minors: list[int], loaded: set[str], owner: Ownership = Ownership()) -> list[Node]:
    """The nodes the loaded driver needs. Pure: from /proc/devices text, the GPUs' minors and loaded modules.

    nvidiactl, nvidia<N> and nvidia-modeset take the driver's owner and mode; the uvm nodes are
    always root's, 0666, as nvidia-modprobe makes them.
    """
    majors = char_majors(proc_devices)
    nvidia = next((majors[n] for n in NVIDIA_MAJOR_NAMES if n in majors), None)
    if nvidia is None:
        raise HostError("the nvidia module registered no character device (no 'nvidia' in /proc/devices)")

    def node(path: str, minor: int) -> Node:
        return Node(path, nvidia, minor, owner.mode, owner.uid, owner.gid)

    nodes = [node("nvidiactl", NVIDIA_CTL_MINOR)]
    nodes += [node(f"nvidia{m}", m) for m in sorted(minors)]
    if "nvidia_modeset" in loaded:
        nodes.append(node("nvidia-modeset", NVIDIA_MODESET_MINOR))
    if "nvidia_uvm" in loaded:
        uvm = majors.get("nvidia-uvm")
        if uvm is None:
            raise HostError("nvidia_uvm is loaded but registered no 'nvidia-uvm' character device")
        nodes += [Node("nvidia-uvm", uvm, 0), Node("nvidia-uvm-tools", uvm, 1)]
    return nodes


def ensure_nodes(dev: Path, nodes: list[Node]) -> list[str]:
    """Create or fix each node (mknod to a temp name, then rename); returns the ones changed."""
    changed = []
    for node in nodes:
        path = dev / node.path
        want = os.makedev(node.major, node.minor)
        try:
            st = path.lstat()
            if (stat.S_ISCHR(st.st_mode) and st.st_rdev == want and stat.S_IMODE(st.st_mode) == node.mode
                    and (st.st_uid, st.st_gid) == (node.uid, node.gid)):
                continue
        except FileNotFoundError:
            pass
        tmp = dev / f".{node.path}.nvidia-agent"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.mknod(tmp, stat.S_IFCHR | node.mode, want)
            os.chown(tmp, node.uid, node.gid)
            tmp.chmod(node.mode)  # mknod applies the umask
            tmp.replace(path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise HostError(f"cannot create {path} (char {node.major}:{node.minor}): {exc.strerror}") from exc
        changed.append(node.path)
    return changed


def missing_nodes(dev: Path, nodes: list[Node]) -> list[str]:
    """The nodes that are not there as the right character devices (when the agent may not make them)."""
    out = []
    for node in nodes:
        try:
            st = (dev / node.path).lstat()
        except FileNotFoundError:
            out.append(node.path)
            continue
        if not stat.S_ISCHR(st.st_mode) or st.st_rdev != os.makedev(node.major, node.minor):
            out.append(node.path)
    return out


# docker-<id>.scope, /docker/<id>, cri-containerd-<id>.scope, crio-<id>.scope, libpod-<id>.scope, and
# kubelet's cgroupfs layout /kubepods/<qos>/pod<uid>/<id>: the ID is 64 hex digits ending a path component
CONTAINER_ID_RE = re.compile(r"(?:^|[/:-])([0-9a-f]{64})(?:\.scope)?$", re.MULTILINE)


def container_id(cgroup: str) -> str | None:
    """The container a process runs in, from its /proc/PID/cgroup (docker, containerd, CRI-O, podman;
    cgroup v1 and v2, cgroupfs and systemd drivers), or None."""
    match = CONTAINER_ID_RE.search(cgroup)
    return match.group(1) if match else None


def holders_of_nodes(proc: Path, prefix: str = "/dev/nvidia") -> list[str]:
    """Processes with a /dev/nvidia* node open, as 'pid (comm) /dev/...', from /proc/*/fd."""
    found = []
    for pid_dir in proc.iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            fds = list((pid_dir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith(prefix):
                try:
                    comm = (pid_dir / "comm").read_text().strip()
                except OSError:
                    comm = "?"
                found.append(f"{pid_dir.name} ({comm}) {target}")
                break
    return sorted(found, key=lambda s: int(s.split()[0]))


class Monitor(Protocol):
    def poll(self, timeout: float | None = None) -> object: ...


def pci_monitor() -> Monitor:
    """A started pyudev monitor of PCI events: udev's (rules applied) where udevd runs, else the kernel's."""
    import pyudev  # noqa: PLC0415 - libudev is only needed on a real host

    source = "udev" if Path("/run/udev/control").exists() else "kernel"
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
    monitor.filter_by("pci")
    monitor.start()
    return monitor  # type: ignore[no-any-return]


def unbound_gpus(sys_pci_devices: Path, slots: tuple[str, ...], driver: str = "nvidia") -> list[str]:
    """GPUs whose sysfs `driver` link does not (yet) point at `driver`."""
    out = []
    for slot in slots:
        try:
            bound = os.readlink(sys_pci_devices / slot / "driver").rsplit("/", 1)[-1]
        except OSError:
            bound = ""
        if bound != driver:
            out.append(slot)
    return out


def wait_gpus_bound(sys_pci_devices: Path, slots: tuple[str, ...], monitor: Monitor, timeout_s: float, *,
                    clock: Callable[[], float] = time.monotonic,
                    cancelled: Callable[[], bool] = lambda: False) -> list[str]:
    """Wait for the driver to bind every GPU, woken by udev's kernel events rather than sleeping.

    `monitor` must already be listening (started before the module load), so a bind that
    happens between a check and the next poll is still an event. Returns the GPUs still
    unbound (all of them at once if the agent is stopping).
    """
    deadline = clock() + timeout_s
    while True:
        left = unbound_gpus(sys_pci_devices, slots)
        remaining = deadline - clock()
        if not left or remaining <= 0 or cancelled():
            return left
        monitor.poll(timeout=min(remaining, POLL_SLICE_S))
