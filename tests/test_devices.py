"""Device nodes: majors from real /proc/devices text, the nodes each driver module needs, holders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.devices import (
    Node,
    Ownership,
    char_majors,
    ensure_nodes,
    gpu_minor,
    holders_of_nodes,
    missing_nodes,
    ownership,
    plan_nodes,
    wait_gpus_bound,
)
from agent.errors import HostError
from tests.conftest import FIXTURES


def test_majors_from_a_real_proc_devices() -> None:
    """Only the character section counts; the real capture names major 195 nvidia-frontend."""
    majors = char_majors((FIXTURES / "proc/devices-nvidia").read_text())
    assert majors["nvidia-frontend"] == 195
    assert majors["nvidia-uvm"] == 234
    assert "blkext" not in majors


def test_nodes_for_two_gpus_with_uvm_and_modeset() -> None:
    """ctl 195:255, one node per GPU 195:N, modeset 195:254, uvm and uvm-tools on the dynamic major."""
    text = (FIXTURES / "proc/devices-nvidia").read_text()
    nodes = plan_nodes(text, [0, 1], {"nvidia", "nvidia_uvm", "nvidia_modeset"})
    assert nodes == [Node("nvidiactl", 195, 255), Node("nvidia0", 195, 0), Node("nvidia1", 195, 1),
                     Node("nvidia-modeset", 195, 254), Node("nvidia-uvm", 234, 0), Node("nvidia-uvm-tools", 234, 1)]


def test_nodes_without_optional_modules() -> None:
    """No uvm or modeset nodes when those modules are not loaded."""
    nodes = plan_nodes("Character devices:\n195 nvidia\n", [0], {"nvidia"})
    assert [n.path for n in nodes] == ["nvidiactl", "nvidia0"]


@pytest.mark.parametrize(("text", "loaded", "message"), [
    ("Character devices:\n  1 mem\n", {"nvidia"}, "registered no character device"),
    ("Character devices:\n195 nvidia\nBlock devices:\n234 nvidia-uvm\n", {"nvidia", "nvidia_uvm"}, "nvidia-uvm"),
])
def test_missing_majors_are_errors(text: str, loaded: set[str], message: str) -> None:
    """A module that loaded but registered no device is reported, not guessed around."""
    with pytest.raises(HostError, match=message):
        plan_nodes(text, [0], loaded)


def test_minors_come_from_the_driver_not_from_pci_order() -> None:
    """An 8-GPU node's real `Device Minor:` lines (2,3,0,1,6,7,4,5 in PCI order) give /dev/nvidia0..7
    for the GPUs the driver numbered so; the single-GPU captures read as the driver printed them."""
    lines = (FIXTURES / "proc/driver-nvidia/device-minors-a100x8.grep").read_text().splitlines()
    by_slot = {line.split("/")[5]: gpu_minor(line.split("information:", 1)[1]) for line in lines}
    assert list(by_slot.values()) == [2, 3, 0, 1, 6, 7, 4, 5]
    nodes = plan_nodes("Character devices:\n195 nvidia\n", list(by_slot.values()), {"nvidia"})
    assert [n.path for n in nodes] == ["nvidiactl"] + [f"nvidia{i}" for i in range(8)]
    assert gpu_minor((FIXTURES / "proc/driver-nvidia/gpus-l4/information").read_text()) == 0
    assert gpu_minor((FIXTURES / "proc/driver-nvidia/gpus/0000:00:1e.0/information").read_text()) == 3
    assert gpu_minor((FIXTURES / "proc/driver-nvidia/gpus-h100-minor5/information").read_text()) == 5
    assert gpu_minor("Model: \t\t X\nDevice Minor: \t 1\nGPU Excluded:\t Yes\n") is None


def test_ownership_follows_the_driver_then_the_parameters_then_the_defaults() -> None:
    """A real params file (decimal 438 = 0666) wins; NVreg_DeviceFile* parameters are read as the kernel
    reads them (0660 is octal); without either the driver's defaults hold, root and 0666."""
    real = (FIXTURES / "proc/driver-nvidia/params-580.105.08-h100x8").read_text()
    assert ownership(real) == Ownership(uid=0, gid=0, mode=0o666, modify=True)
    configured = ("NVreg_DeviceFileGID=44", "NVreg_DeviceFileMode=0660", "NVreg_EnableGpuFirmware=0")
    assert ownership(None, configured) == Ownership(uid=0, gid=44, mode=0o660, modify=True)
    told = real.replace("DeviceFileGID: 0", "DeviceFileGID: 44").replace("DeviceFileMode: 438", "DeviceFileMode: 432")
    assert ownership(told, configured) == Ownership(uid=0, gid=44, mode=0o660, modify=True)
    assert not ownership(real.replace("ModifyDeviceFiles: 1", "ModifyDeviceFiles: 0")).modify
    assert ownership(None) == Ownership()


def test_driver_nodes_take_the_owner_uvm_nodes_stay_root() -> None:
    """nvidiactl, nvidia<N> and modeset get the driver's owner and mode; the uvm pair stays root 0666,
    as nvidia-modprobe makes them."""
    owner = Ownership(uid=0, gid=44, mode=0o660)
    nodes = plan_nodes((FIXTURES / "proc/devices-nvidia-nvswitch").read_text(), [3], {"nvidia", "nvidia_uvm"}, owner)
    assert [(n.path, n.major, n.minor, n.gid, oct(n.mode)) for n in nodes] == [
        ("nvidiactl", 195, 255, 44, "0o660"), ("nvidia3", 195, 3, 44, "0o660"),
        ("nvidia-uvm", 510, 0, 0, "0o666"), ("nvidia-uvm-tools", 510, 1, 0, "0o666")]


def test_ensure_nodes_sets_owner_and_mode_and_leaves_right_ones(tmp_path: Path) -> None:
    """A node with the right numbers but the wrong group or mode is fixed; a right one is not touched."""
    os.mknod(tmp_path / "nvidiactl", stat.S_IFCHR | 0o600, os.makedev(195, 255))
    want = Node("nvidiactl", 195, 255, 0o660, 0, 44)
    assert ensure_nodes(tmp_path, [want]) == ["nvidiactl"]
    st = (tmp_path / "nvidiactl").stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, 44)
    assert ensure_nodes(tmp_path, [want]) == []
    assert missing_nodes(tmp_path, [want, Node("nvidia0", 195, 0)]) == ["nvidia0"]


def test_ensure_nodes_creates_fixes_and_leaves_right_ones(tmp_path: Path) -> None:
    """Real mknod: missing nodes created with mode 0666, wrong ones replaced, right ones untouched."""
    os.mknod(tmp_path / "nvidia0", stat.S_IFCHR | 0o666, os.makedev(195, 7))  # wrong minor
    os.mknod(tmp_path / "nvidiactl", stat.S_IFCHR | 0o666, os.makedev(195, 255))
    os.chmod(tmp_path / "nvidiactl", 0o666)  # noqa: S103 - the driver's own default mode for its nodes
    before = (tmp_path / "nvidiactl").stat().st_ino
    changed = ensure_nodes(tmp_path, [Node("nvidiactl", 195, 255), Node("nvidia0", 195, 0), Node("nvidia1", 195, 1)])
    assert changed == ["nvidia0", "nvidia1"]
    assert (tmp_path / "nvidiactl").stat().st_ino == before
    st = (tmp_path / "nvidia0").stat()
    assert (os.major(st.st_rdev), os.minor(st.st_rdev), stat.S_IMODE(st.st_mode)) == (195, 0, 0o666)
    assert ensure_nodes(tmp_path, [Node("nvidia0", 195, 0)]) == []


def test_holders_are_found_through_proc_fd(tmp_path: Path) -> None:
    """A process holding /dev/nvidia0 is named with its pid and command."""
    for pid, comm, target in ((42, "cuda-app", "/dev/nvidia0"), (7, "bash", "/dev/pts/0")):
        fd = tmp_path / str(pid) / "fd"
        fd.mkdir(parents=True)
        (fd / "3").symlink_to(target)
        (tmp_path / str(pid) / "comm").write_text(comm + "\n")
    (tmp_path / "self").mkdir()
    assert holders_of_nodes(tmp_path) == ["42 (cuda-app) /dev/nvidia0"]


class BindingMonitor:
    """Stands in for the udev monitor: each poll is one event, and the driver binds one GPU per event."""

    def __init__(self, pci: Path, slots: list[str]) -> None:
        self.pci = pci
        self.pending = list(slots)
        self.polls = 0

    def poll(self, timeout: float | None = None) -> object:
        self.polls += 1
        if self.pending:
            (self.pci / self.pending.pop(0) / "driver").symlink_to("../../bus/pci/drivers/nvidia")
        return object()


def test_wait_for_binding_wakes_on_events_until_all_gpus_are_bound(tmp_path: Path) -> None:
    """The wait ends as soon as every GPU's driver link names nvidia; no sleeping."""
    for slot in ("0000:00:05.0", "0000:00:06.0"):
        (tmp_path / slot).mkdir()
    monitor = BindingMonitor(tmp_path, ["0000:00:05.0", "0000:00:06.0"])
    assert wait_gpus_bound(tmp_path, ("0000:00:05.0", "0000:00:06.0"), monitor, 30) == []
    assert monitor.polls == 2


def test_wait_for_binding_gives_up_and_names_the_unbound(tmp_path: Path) -> None:
    """A GPU the driver never binds is reported after the timeout."""
    (tmp_path / "0000:00:05.0").mkdir()
    now = [0.0]

    class Silent:
        def poll(self, timeout: float | None = None) -> object:
            now[0] += timeout or 0
            return None

    assert wait_gpus_bound(tmp_path, ("0000:00:05.0",), Silent(), 5, clock=lambda: now[0]) == ["0000:00:05.0"]
