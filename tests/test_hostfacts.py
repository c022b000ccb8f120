"""Host facts: os-release of real distributions, mountinfo, GPU discovery by PCI vendor and class."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.hostfacts import (
    GPU,
    HostFacts,
    HostProbe,
    OSInfo,
    find_gpus,
    host_view_mounts,
    os_info,
    os_key,
    parse_mountinfo,
    parse_os_release,
    read_modules,
    read_mountinfo,
    visible_mount,
)
from agent.hostroot import HostRoot
from agent.mount import MountState, classify
from tests.conftest import FIXTURES, write

KERNEL = "6.1.0-28-amd64"
OS_CASES = [
    # fixture, os id, version, coreos family, os key
    ("flatcar-3139.2.0", "flatcar", "3139.2.0", True, f"flatcar-3139.2.0-{KERNEL}"),
    ("coreos-1911.5.0", "coreos", "1911.5.0", True, f"coreos-1911.5.0-{KERNEL}"),
    ("fedora-coreos-37", "fedora-coreos", "37.20230126.20.0", True, f"fedora-coreos-37.20230126.20.0-{KERNEL}"),
    ("rhcos-4.12", "rhcos", "412.86.202301311551-0", True, f"rhcos-412.86.202301311551-0-{KERNEL}"),
    ("rhcos-4.13", "rhcos", "413.90.202212151724-0", True, f"rhcos-413.90.202212151724-0-{KERNEL}"),
    ("rhcos-10.1-ocp-4.20", "rhel-coreos", "10.1.20251005-0", True, f"rhel-coreos-10.1.20251005-0-{KERNEL}"),
    ("scos-4.12", "scos", "412.9.202211241749-0", True, f"scos-412.9.202211241749-0-{KERNEL}"),
    ("ubuntu-22.04", "ubuntu", "22.04", False, f"ubuntu-22.04-{KERNEL}"),
    ("ubuntu-24.04", "ubuntu", "24.04", False, f"ubuntu-24.04-{KERNEL}"),
    ("debian-12", "debian", "12", False, f"debian-12-{KERNEL}"),
]


@pytest.mark.parametrize(("fixture", "os_id", "version", "coreos", "key"), OS_CASES, ids=[c[0] for c in OS_CASES])
def test_os_release_of_real_distributions(fixture: str, os_id: str, version: str, coreos: bool, key: str) -> None:
    """Every OS keys on id, version and kernel: not even a CoreOS build pins the kernel (RHCOS real-time
    and 64k-page kernels, `rpm-ostree override replace`)."""
    info = os_info(parse_os_release((FIXTURES / "os-release" / fixture).read_text()))
    assert (info.id, info.version, info.coreos_family) == (os_id, version, coreos)
    assert os_key(info, KERNEL) == key


def test_os_key_changes_with_the_kernel_on_plain_distros() -> None:
    """On Ubuntu a kernel update alone must give another install directory."""
    info = os_info(parse_os_release((FIXTURES / "os-release/ubuntu-22.04").read_text()))
    assert os_key(info, "5.15.0-91-generic") != os_key(info, "5.15.0-92-generic")


def test_os_release_quoting_and_comments() -> None:
    """Shell quoting, comments and junk lines as os-release(5) allows."""
    fields = parse_os_release('# c\nID="my os"\nNAME=\'x y\'\nBAD LINE\nVERSION_ID=1.2 # tail\n')
    assert fields["ID"] == "my os"
    assert fields["NAME"] == "x y"
    assert fields["VERSION_ID"] == "1.2"


def test_mountinfo_fixture_with_overlays() -> None:
    """A real Docker host's mountinfo: overlay lowerdirs parsed, octal escapes decoded."""
    mounts = parse_mountinfo((FIXTURES / "mountinfo/host-fedora-docker-overlay2").read_text())
    overlays = [m for m in mounts if m.fs_type == "overlay"]
    assert overlays, "fixture has overlay mounts"
    assert all("lowerdir" in m.options for m in overlays)
    spaced = parse_mountinfo(r"36 35 98:0 / /mnt/a\040b rw - ext3 /dev/x\040y rw,errors=continue")
    assert spaced[0].mount_point == "/mnt/a b"
    assert spaced[0].source == "/dev/x y"


def test_visible_mount_is_the_last_stacked_one() -> None:
    """Stacked mounts at one point: the one stacked on top (a child of the other) is visible."""
    mounts = parse_mountinfo(
        "1 0 0:1 / / rw - ext4 /dev/a rw\n"
        "2 1 0:2 / /usr/lib64 ro - ext4 /dev/b ro\n"
        "3 2 0:3 / /usr/lib64 ro - overlay nvidia-agent ro,lowerdir=/x:/y\n")
    top = visible_mount(mounts, "/usr/lib64")
    assert top is not None and top.source == "nvidia-agent"
    assert visible_mount(mounts, "/usr/lib64/libc.so.6") == top
    assert visible_mount(mounts, "/usr/lib").mount_point == "/"  # type: ignore[union-attr]


# systemd-sysext merge after the agent's overlay (systemd 252, as seen in the VM guest): the merge
# mounts on /usr, on top of the mount that holds /usr; the agent's /usr/lib64 overlay stays
# listed but its parent is no longer on the way to /usr/lib64.
SYSEXT_OVER_OURS = (
    "21 1 254:1 / / rw,relatime - ext4 /dev/vda rw\n"
    "40 21 0:35 / /usr/lib64 ro,relatime - overlay nvidia-agent ro,lowerdir=/opt/nvidia/t/lib64:/usr/lib64\n"
    "52 21 0:41 / /usr ro,nodev,relatime - overlay sysext "
    "ro,lowerdir=/run/systemd/sysext/meta/usr:/run/systemd/sysext/extensions/x/usr:/usr\n")


def test_a_mount_on_an_ancestor_made_later_hides_ours() -> None:
    """The sysext overlay on /usr covers /usr/lib64: ours is listed, but not what /usr/lib64 shows."""
    mounts = parse_mountinfo(SYSEXT_OVER_OURS)
    assert visible_mount(mounts, "/usr/lib64").source == "sysext"  # type: ignore[union-attr]
    again = parse_mountinfo(SYSEXT_OVER_OURS + "60 52 0:50 / /usr/lib64 ro - overlay nvidia-agent "
                            "ro,lowerdir=/opt/nvidia/t/lib64:/usr/lib64\n")
    seen = visible_mount(again, "/usr/lib64")
    assert seen is not None and seen.mount_id == 60  # mounted again, on top of the merge: shown


def test_a_real_sysext_merge_hides_the_first_overlay_and_shows_the_second() -> None:
    """Captured in the VM guest: the agent's first overlay (161) stays listed under sysext's /usr (171);
    what /usr/lib64 shows is the one mounted again on top (173). Before that remount, nothing of ours."""
    text = (FIXTURES / "mountinfo/debian12-sysext-over-agent-overlay").read_text()
    lower = "/opt/nvidia/535.999.01/debian-12-6.1.0-57-amd64/lib64"
    seen = visible_mount(parse_mountinfo(text), "/usr/lib64")
    assert seen is not None and (seen.mount_id, seen.parent_id, seen.source) == (173, 171, "nvidia-agent")
    before = parse_mountinfo("".join(line + "\n" for line in text.splitlines() if not line.startswith("173 ")))
    assert [m.mount_id for m in before if m.source == "nvidia-agent"] == [161]
    assert visible_mount(before, "/usr/lib64").source == "sysext"  # type: ignore[union-attr]
    facts = HostFacts(OSInfo("debian", "12", "Debian", coreos_family=False), "k", "amd64", (), {}, before, True)
    assert facts.lib_mount is None and classify(facts.lib_mount, lower) is MountState.ABSENT


def test_a_mount_point_that_is_not_utf8_is_read_not_fatal(tmp_path: Path) -> None:
    """mountinfo escapes only space, tab, newline and backslash: other bytes arrive raw."""
    path = tmp_path / "mountinfo"
    path.write_bytes(b"1 0 0:1 / / rw - ext4 /dev/a rw\n2 1 0:2 / /mnt/\xff rw - tmpfs x rw\n")
    mounts = parse_mountinfo(read_mountinfo(path))
    assert os.fsencode(mounts[1].mount_point) == b"/mnt/\xff"
    assert visible_mount(mounts, "/usr/lib64").mount_id == 1  # type: ignore[union-attr]


def test_the_walk_starts_at_mounts_whose_parent_is_not_listed() -> None:
    """Under a host root the namespace's own root is filtered out; a parent cycle does not hang."""
    mounts = parse_mountinfo("7 3 0:1 / /usr rw - ext4 /dev/a rw\n8 7 0:2 / /usr/lib64 ro - tmpfs t ro\n")
    assert visible_mount(mounts, "/usr/lib64").mount_id == 8  # type: ignore[union-attr]
    assert visible_mount(mounts, "/etc") is None
    cycle = parse_mountinfo("5 6 0:1 / /a rw - ext4 x rw\n6 5 0:2 / /a rw - ext4 y rw\n")
    assert visible_mount(cycle, "/a/b") is None  # no mount to start from: none is known to be visible


PATHS = ("/", "/usr", "/usr/lib64", "/usr/lib", "/opt", "/usr/lib64/gbm")


class MountTable:
    """A namespace's mounts as the kernel keeps them: a new mount's parent is the mount a lookup
    of its point ends on; a lookup crosses, component by component, every mount on the way."""

    def __init__(self) -> None:
        self.mounts = [(1, 0, "/")]  # (id, parent, point)
        self.next_id = 100

    def lookup(self, path: str) -> int:
        here, prefix = 1, "/"
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts) + 1):
            prefix = "/" + "/".join(parts[:depth])
            while (on := [m for m, parent, point in self.mounts if parent == here and point == prefix]):
                here = on[-1]
        return here

    def mount(self, point: str) -> None:
        self.next_id += 1
        self.mounts.append((self.next_id, self.lookup(point), point))

    def umount(self, point: str) -> None:
        top = self.lookup(point)
        if top != 1 and {m: p for m, _, p in self.mounts}[top] == point \
                and not any(parent == top for _, parent, _ in self.mounts):
            self.mounts = [m for m in self.mounts if m[0] != top]

    def mountinfo(self) -> str:
        return "".join(f"{m} {parent} 0:{m} / {point} rw - tmpfs t{m} rw\n" for m, parent, point in self.mounts)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.sampled_from(PATHS)), max_size=14), st.randoms(use_true_random=False))
def test_visible_mount_agrees_with_a_path_walk(ops: list[tuple[bool, str]], rng: object) -> None:
    """Any sequence of mounts and unmounts over nested points, listed in any order: the mount
    visible_mount names is the one a component-by-component lookup ends on."""
    table = MountTable()
    for is_mount, point in ops:
        table.mount(point) if is_mount else table.umount(point)
    lines = table.mountinfo().splitlines(keepends=True)
    rng.shuffle(lines[1:])  # type: ignore[attr-defined]
    mounts = parse_mountinfo("".join(lines))
    for path in PATHS:
        seen = visible_mount(mounts, path)
        assert seen is not None and seen.mount_id == table.lookup(path), (path, table.mounts)


def test_mounts_are_seen_as_host_paths_under_a_host_root(tmp_path: Path) -> None:
    """Under /host, mount points and overlay lowerdirs are renamed to the host's own paths."""
    root = tmp_path / "host"
    lower = f"{root}/opt/nvidia/x/lib64:{root}/usr/lib64"
    text = (f"1 0 0:1 / {root}/usr/lib64 ro - overlay nvidia-agent ro,lowerdir={lower}\n"
            "2 0 0:2 / /proc rw - proc proc rw\n")
    mounts = host_view_mounts(parse_mountinfo(text), HostRoot(root))
    assert [m.mount_point for m in mounts] == ["/usr/lib64"]
    assert mounts[0].options["lowerdir"] == "/opt/nvidia/x/lib64:/usr/lib64"


@dataclass
class FakeDevice:
    sys_name: str
    attributes: dict[str, bytes] = field(default_factory=dict)


class FakeUdev:
    """Records the query; answers with the given devices."""

    def __init__(self, devices: list[FakeDevice]) -> None:
        self.devices = devices
        self.queries: list[dict[str, str]] = []

    def list_devices(self, **kwargs: str) -> list[FakeDevice]:
        self.queries.append(kwargs)
        return self.devices


def pci(slot: str, vendor: int, device: int, cls: int) -> FakeDevice:
    return FakeDevice(slot, {"vendor": f"0x{vendor:04x}".encode(), "device": f"0x{device:04x}".encode(),
                             "class": f"0x{cls:06x}".encode()})


def test_gpus_are_vga_and_3d_controllers_of_vendor_10de() -> None:
    """Datacenter cards are 3D controllers (0x0302): both classes count, audio functions and others do not."""
    udev = FakeUdev([
        pci("0000:00:06.0", 0x10DE, 0x2204, 0x030000),  # GeForce: VGA
        pci("0000:00:05.0", 0x10DE, 0x2330, 0x030200),  # H100: 3D controller
        pci("0000:00:06.1", 0x10DE, 0x1AEF, 0x040300),  # the GPU's HDMI audio function
        pci("0000:00:02.0", 0x8086, 0x46A6, 0x030000),  # Intel VGA
        FakeDevice("0000:00:07.0", {"vendor": b"garbage"}),
    ])
    gpus = find_gpus(udev)
    assert gpus == (GPU("0000:00:05.0", 0x2330, 0x030200), GPU("0000:00:06.0", 0x2204, 0x030000))
    assert [g.kind for g in gpus] == ["3D controller", "VGA compatible controller"]
    assert udev.queries == [{"subsystem": "pci"}]


def test_probe_reads_kernel_os_and_modules_under_the_host_root(tmp_path: Path) -> None:
    """The probe reads everything through the host root, so a temp dir can stand in for a host."""
    write(tmp_path / "proc/sys/kernel/osrelease", "6.6.6-test\n")
    write(tmp_path / "usr/lib/os-release", (FIXTURES / "os-release/flatcar-3139.2.0").read_text())
    write(tmp_path / "sys/module/nvidia/initstate", "live\n")
    write(tmp_path / "sys/module/nvidia/version", "535.261.03\n")
    write(tmp_path / "sys/module/nvidia_uvm/initstate", "live\n")  # no version file
    write(tmp_path / "sys/module/builtin_thing/parameters/x", "1\n")  # built-in: no initstate
    probe = HostProbe(HostRoot(tmp_path), udev=FakeUdev([]))
    assert probe.kernel() == "6.6.6-test"
    assert probe.os().id == "flatcar"
    assert read_modules(tmp_path / "sys/module") == {"nvidia": "535.261.03", "nvidia_uvm": ""}
    assert probe.gpus() == ()


def test_a_symlinked_path_is_resolved_on_the_host_root(tmp_path: Path) -> None:
    """`/lib64 -> usr/lib64` (Fedora) and an absolute `/lib64 -> /usr/lib64` both resolve to the host's
    /usr/lib64 under the host root, never outside it; a missing part is kept as written."""
    (tmp_path / "usr/lib64").mkdir(parents=True)
    (tmp_path / "lib64").symlink_to("usr/lib64")
    (tmp_path / "abs").symlink_to("/usr/lib64")
    (tmp_path / "usr/escape").symlink_to("../../../../etc")
    host = HostRoot(tmp_path)
    assert host.resolve("/lib64") == "/usr/lib64"
    assert host.resolve("/abs") == "/usr/lib64"
    assert host.resolve("/usr/lib64") == "/usr/lib64"
    assert host.resolve("/usr/escape/x") == "/etc/x"  # `..` stops at the host's root
    assert host.resolve("/missing/dir") == "/missing/dir"
    probe = HostProbe(host, udev=FakeUdev([]))
    write(tmp_path / "proc/sys/kernel/osrelease", "6.6.6\n")
    write(tmp_path / "etc/os-release", "ID=fedora\nVARIANT_ID=coreos\nOSTREE_VERSION=39.1\n")
    assert probe.facts("/lib64").lib_dir == "/usr/lib64"


def test_gpus_passed_through_to_vms_are_not_the_hosts(tmp_path: Path) -> None:
    """A GPU bound to vfio-pci belongs to a VM: the host's facts leave it out (no device node, no
    minor), and list it apart."""
    bound = pci("0000:00:05.0", 0x10DE, 0x2330, 0x030200)
    vfio = pci("0000:00:06.0", 0x10DE, 0x2330, 0x030200)
    vfio.driver = "vfio-pci"  # type: ignore[attr-defined]
    write(tmp_path / "proc/sys/kernel/osrelease", "6.6.6\n")
    write(tmp_path / "etc/os-release", "ID=debian\nVERSION_ID=12\n")
    facts = HostProbe(HostRoot(tmp_path), udev=FakeUdev([bound, vfio])).facts()
    assert [g.pci_slot for g in facts.gpus] == ["0000:00:05.0"]
    assert [(g.pci_slot, g.driver) for g in facts.passthrough] == [("0000:00:06.0", "vfio-pci")]
