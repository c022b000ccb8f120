"""Device nodes: majors from real /proc/devices text, the nodes each driver module needs, holders."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from agent.devices import Node, char_majors, ensure_nodes, holders_of_nodes, plan_nodes, wait_gpus_bound
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
    nodes = plan_nodes(text, 2, {"nvidia", "nvidia_uvm", "nvidia_modeset"})
    assert nodes == [Node("nvidiactl", 195, 255), Node("nvidia0", 195, 0), Node("nvidia1", 195, 1),
                     Node("nvidia-modeset", 195, 254), Node("nvidia-uvm", 234, 0), Node("nvidia-uvm-tools", 234, 1)]


def test_nodes_without_optional_modules() -> None:
    """No uvm or modeset nodes when those modules are not loaded."""
    nodes = plan_nodes("Character devices:\n195 nvidia\n", 1, {"nvidia"})
    assert [n.path for n in nodes] == ["nvidiactl", "nvidia0"]


@pytest.mark.parametrize(("text", "loaded", "message"), [
    ("Character devices:\n  1 mem\n", {"nvidia"}, "registered no character device"),
    ("Character devices:\n195 nvidia\nBlock devices:\n234 nvidia-uvm\n", {"nvidia", "nvidia_uvm"}, "nvidia-uvm"),
])
def test_missing_majors_are_errors(text: str, loaded: set[str], message: str) -> None:
    """A module that loaded but registered no device is reported, not guessed around."""
    with pytest.raises(HostError, match=message):
        plan_nodes(text, 1, loaded)


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
