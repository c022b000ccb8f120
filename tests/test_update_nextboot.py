"""agent/update: the next boot's OS and kernel, from real updater outputs and real kernel headers
(tests/fixtures/update/SOURCES.md lists where each came from), and hostile ones generated."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cancel import Cancel
from agent.errors import HostError
from agent.hostfacts import HostFacts, OSInfo
from agent.hostroot import HostRoot
from agent.reconcile import _Preempt
from agent.state import load_state
from agent.status import Snapshot, render_text
from agent.update import Ambiguous, bzimage, flatcar_next_kernel, next_boot, rpm_ostree, update_engine
from agent.update.watch import NextBootProbe, source_for

FIXTURES = Path(__file__).parent / "fixtures/update"


# ----------------------------------------------------------------------------- bzImage headers

@pytest.mark.parametrize("release", ["6.1.0-57-amd64", "6.1.0-57-cloud-amd64"])
def test_release_from_a_real_kernel_header(release: str) -> None:
    head = (FIXTURES / f"vmlinuz-{release}.head").read_bytes()
    assert bzimage.kernel_release(head) == release


def fake_header(version: bytes, pointer: int = 0x100, protocol: int = 0x20F, size: int = 0x800) -> bytes:
    head = bytearray(size)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, protocol)
    struct.pack_into("<H", head, 0x20E, pointer)
    if pointer:
        at = pointer + 0x200
        head[at:at + len(version)] = version
    return bytes(head)


@pytest.mark.parametrize(("head", "why"), [
    (b"\x00" * 0x1000, "no Linux boot header"),
    (fake_header(b"6.1.0 x\0", protocol=0x1FF), "no kernel_version field"),
    (fake_header(b"6.1.0 x\0", pointer=0), "no kernel version string"),
    (fake_header(b"6.1.0 x\0", pointer=0x7000), "past the"),
    (fake_header(b"6" * 600), "no NUL within"),
    (fake_header(b"GRUB lnxboot\0"), "does not begin with a kernel release"),
    (fake_header(b"../../etc x\0"), "does not begin with a kernel release"),
    (b"HdrS", "no Linux boot header"),
])
def test_not_a_bzimage_says_why(head: bytes, why: str) -> None:
    with pytest.raises(bzimage.NotABzImage, match=why):
        bzimage.kernel_release(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=0x900), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_any_header_gives_a_release_or_not_a_bzimage(noise: bytes, pointer: int, protocol: int) -> None:
    head = bytearray(noise.ljust(0x220, b"\0"))
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, protocol)
    struct.pack_into("<H", head, 0x20E, pointer)
    try:
        release = bzimage.kernel_release(bytes(head))
    except bzimage.NotABzImage:
        return
    assert bzimage.RELEASE.fullmatch(release) and "/" not in release


# ----------------------------------------------------------------------------- update_engine

@pytest.mark.parametrize(("fixture", "operation", "staged"), [
    ("ue-flatcar-need-reboot.txt", "UPDATE_STATUS_UPDATED_NEED_REBOOT", "2079.3.2"),
    ("ue-flatcar-update-available.txt", "UPDATE_STATUS_UPDATE_AVAILABLE", None),
    ("ue-flatcar-idle.txt", "UPDATE_STATUS_IDLE", None),
    ("ue-coreos-downloading.txt", "UPDATE_STATUS_DOWNLOADING", None),
    # reboot needed, but this old update_engine did not say into what: nothing to stage for
    ("ue-coreos-need-reboot-no-version.txt", "UPDATE_STATUS_UPDATED_NEED_REBOOT", None),
])
def test_real_update_engine_status(fixture: str, operation: str, staged: str | None) -> None:
    status = update_engine.parse_client_output((FIXTURES / fixture).read_text())
    assert status.current_operation == operation
    assert status.staged_version == staged


def test_a_refused_status_call_is_an_error_not_an_idle_updater() -> None:
    with pytest.raises(update_engine.BadStatus, match=r"refused.*run as root"):
        update_engine.parse_client_output((FIXTURES / "ue-flatcar-refused.txt").read_text())


def test_the_dbus_reply_is_the_same_five_values() -> None:
    status = update_engine.Status.from_dbus((1556272591, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "2079.3.2",
                                             399568805))
    assert status == update_engine.parse_client_output((FIXTURES / "ue-flatcar-need-reboot.txt").read_text())


@pytest.mark.parametrize("values", [
    (0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0"),
    (0, 0.0, "UPDATE_STATUS_DONE", "0.0.0", 0),
    (0, 1.5, "UPDATE_STATUS_IDLE", "0.0.0", 0),
    (True, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0),
    (0, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "../../3815", 0),
    (0, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "3815.2.1\n", 0),
    (0, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", 3815, 0),
])
def test_a_reply_the_interface_cannot_give_is_refused(values: tuple[object, ...]) -> None:
    with pytest.raises(update_engine.BadStatus):
        update_engine.Status.from_dbus(values)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=40), st.booleans(),
                          st.none(), st.sampled_from(update_engine.OPERATIONS)), max_size=6))
def test_any_reply_is_a_status_or_bad_status(values: list[object]) -> None:
    try:
        status = update_engine.Status.from_dbus(values)
    except update_engine.BadStatus:
        return
    version = status.staged_version
    assert version is None or (update_engine.VERSION.fullmatch(version) and "/" not in version)


# ----------------------------------------------------------------------------- rpm-ostree

def test_the_staged_fedora_coreos_deployment() -> None:
    nxt = rpm_ostree.next_deployment(
        json.loads((FIXTURES / "rpm-ostree-status-staged.json").read_text())["deployments"])
    assert nxt is not None and (nxt.staged, nxt.booted) == (True, False)
    assert nxt.version == "31.20200517.3.0" and nxt.osname == "fedora-coreos"
    assert str(nxt.root) == ("/ostree/deploy/fedora-coreos/deploy/"
                             "967b7b8d624e6d10ff51c2e81ef198fae966c567ac2e9b479771c693d0987949.0")


def test_the_staged_bootc_deployment() -> None:
    nxt = rpm_ostree.next_deployment(
        json.loads((FIXTURES / "rpm-ostree-status-staged-bootc.json").read_text())["deployments"])
    assert nxt is not None and nxt.version == "9.20240207.0" and nxt.osname == "default"


def test_the_next_deployment_checks_only_the_one_it_picks() -> None:
    records = json.loads((FIXTURES / "rpm-ostree-status-staged.json").read_text())["deployments"]
    staged, booted = records
    nxt = rpm_ostree.next_deployment(records)
    assert nxt is not None and nxt.staged and nxt.version == "31.20200517.3.0"
    # an odd label on another deployment does not stop detection
    assert rpm_ostree.next_deployment([staged, {**booted, "version": "bad/label"}]) == nxt
    # a pending (not staged) default deployment is the next boot too; the booted one first: none
    pending = {k: v for k, v in staged.items() if k != "staged"}
    pending_next = rpm_ostree.next_deployment([pending, booted])
    assert pending_next is not None and not pending_next.staged
    assert rpm_ostree.next_deployment([booted, pending]) is None
    assert rpm_ostree.next_deployment([]) is None
    with pytest.raises(rpm_ostree.BadDeployment, match="osname"):
        rpm_ostree.next_deployment([{**staged, "osname": "../x"}])


def test_nothing_staged() -> None:
    records = json.loads((FIXTURES / "rpm-ostree-status-staged.json").read_text())["deployments"]
    assert rpm_ostree.next_deployment([r for r in records if not r.get("staged")]) is None


@pytest.mark.parametrize(("change", "why"), [
    ({"osname": "../../etc"}, "osname"),
    ({"checksum": "abc"}, "not a sha256"),
    ({"serial": -1}, "serial"),
    ({"serial": True}, "serial"),
    ({"version": "31/../x"}, "version"),
    ({"staged": "yes"}, "booleans"),
])
def test_a_deployment_rpm_ostree_could_not_have_written_is_refused(change: dict[str, object], why: str) -> None:
    record = json.loads((FIXTURES / "rpm-ostree-status-staged.json").read_text())["deployments"][0]
    with pytest.raises(rpm_ostree.BadDeployment, match=why):
        rpm_ostree.next_deployment([{**record, **change}])


def test_two_staged_deployments_are_refused() -> None:
    record = json.loads((FIXTURES / "rpm-ostree-status-staged.json").read_text())["deployments"][0]
    with pytest.raises(rpm_ostree.BadDeployment, match="2 staged"):
        rpm_ostree.next_deployment([record, {**record, "serial": 1}])


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(["osname", "checksum", "serial", "version", "staged", "booted", "id"]),
                                st.one_of(st.text(max_size=70), st.integers(-2, 2**32), st.booleans(), st.none(),
                                          st.just("a" * 64)), max_size=7), max_size=3))
def test_any_deployment_list_parses_or_is_refused(records: list[dict[str, object]]) -> None:
    try:
        d = rpm_ostree.next_deployment(records)
    except rpm_ostree.BadDeployment:
        return
    assert d is None or (d.root.is_relative_to("/ostree/deploy") and ".." not in d.root.parts and not d.booted)


def test_the_kernel_of_a_deployment_is_the_modules_dir_with_a_vmlinuz() -> None:
    assert rpm_ostree.kernel_release({"6.8.9-300.fc40.x86_64": True, "extra": False}) == "6.8.9-300.fc40.x86_64"
    with pytest.raises(rpm_ostree.BadDeployment, match="expected one kernel"):
        rpm_ostree.kernel_release({"6.8.9-300.fc40.x86_64": True, "6.9.1-300.fc40.x86_64": True})
    with pytest.raises(rpm_ostree.BadDeployment, match="none"):
        rpm_ostree.kernel_release({"6.8.9-300.fc40.x86_64": False})


# ----------------------------------------------------------------------------- the next boot

FLATCAR = OSInfo(id="flatcar", version="3815.2.0", pretty_name="Flatcar Container Linux", coreos_family=True)


def test_next_boot_keys_the_new_os_version_and_kernel() -> None:
    nb = next_boot(FLATCAR, "6.6.21-flatcar", "update_engine", version="3815.2.1")
    assert nb.os_key == "flatcar-3815.2.1-6.6.21-flatcar"
    assert next_boot(FLATCAR, "6.6.30-flatcar", "kernel-postinst").os_key == "flatcar-3815.2.0-6.6.30-flatcar"


@pytest.mark.parametrize(("running", "slots", "want"), [
    ("6.1.0-57-amd64", {"a": "6.1.0-57-amd64", "b": "6.1.0-57-cloud-amd64"}, "6.1.0-57-cloud-amd64"),
    ("6.1.0-57-amd64", {"a": "6.1.0-58-amd64", "b": "6.1.0-57-amd64"}, "6.1.0-58-amd64"),
    ("6.1.0-57-amd64", {"a": "6.1.0-57-amd64", "b": "6.1.0-57-amd64"}, "6.1.0-57-amd64"),
    ("6.1.0-57-amd64", {"a": "6.1.0-57-amd64"}, "6.1.0-57-amd64"),
])
def test_flatcar_next_kernel(running: str, slots: dict[str, str], want: str) -> None:
    assert flatcar_next_kernel(running, slots) == want


@pytest.mark.parametrize("slots", [{"a": "6.1.0-58-amd64", "b": "6.1.0-59-amd64"}, {}])
def test_flatcar_next_kernel_is_not_guessed(slots: dict[str, str]) -> None:
    with pytest.raises(Ambiguous):
        flatcar_next_kernel("6.1.0-57-amd64", slots)


# ----------------------------------------------------------------------------- reading it off a host

class Updaters:
    """What agent/update/bus.py returns (its bus side is tests/test_update_bus.py)."""

    def __init__(self, status: update_engine.Status | None = None,
                 records: list[dict[str, object]] | None = None) -> None:
        self.status, self.records = status, records or []
        self.asked = 0

    def update_engine_status(self) -> update_engine.Status:
        assert self.status is not None
        return self.status

    def rpm_ostree_next(self) -> rpm_ostree.Deployment | None:
        self.asked += 1
        return rpm_ostree.next_deployment(self.records)


def facts_for(os_: OSInfo, kernel: str) -> HostFacts:
    return HostFacts(os=os_, kernel=kernel, arch="amd64", gpus=(), modules={}, mounts=(), modules_supported=True,
                     lib_dir="/usr/lib64")


NEED_REBOOT = update_engine.Status(1, 0.0, update_engine.NEED_REBOOT, "3815.2.1", 1)


def flatcar_root(tmp_path: Path, slots: dict[str, str]) -> HostRoot:
    for slot, release in slots.items():
        (tmp_path / "boot/flatcar").mkdir(parents=True, exist_ok=True)
        (tmp_path / f"boot/flatcar/vmlinuz-{slot}").write_bytes((FIXTURES / f"vmlinuz-{release}.head").read_bytes())
    return HostRoot(tmp_path)


def test_flatcar_next_boot_from_update_engine_and_the_kernel_it_wrote(tmp_path: Path) -> None:
    host = flatcar_root(tmp_path, {"a": "6.1.0-57-amd64", "b": "6.1.0-57-cloud-amd64"})
    probe = NextBootProbe(host, Updaters(NEED_REBOOT))  # type: ignore[arg-type]
    nb = probe.next_boot(facts_for(FLATCAR, "6.1.0-57-amd64"), "update_engine")
    assert nb is not None and nb.source == "update_engine"
    assert nb.os_key == "flatcar-3815.2.1-6.1.0-57-cloud-amd64"
    idle = update_engine.Status(1, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0)
    assert NextBootProbe(host, Updaters(idle)).next_boot(  # type: ignore[arg-type]
        facts_for(FLATCAR, "6.1.0-57-amd64"), "update_engine") is None


def test_flatcar_slots_that_do_not_say_which_kernel_is_next_are_a_host_error(tmp_path: Path) -> None:
    host = flatcar_root(tmp_path, {"a": "6.1.0-57-amd64", "b": "6.1.0-57-cloud-amd64"})
    with pytest.raises(HostError, match="next kernel is unknown"):
        NextBootProbe(host, Updaters(NEED_REBOOT)).next_boot(  # type: ignore[arg-type]
            facts_for(FLATCAR, "6.1.0-99-amd64"), "update_engine")
    (tmp_path / "boot/flatcar/vmlinuz-b").write_bytes(b"\0" * 4096)
    with pytest.raises(HostError, match="vmlinuz-b: no Linux boot header"):
        NextBootProbe(host, Updaters(NEED_REBOOT)).next_boot(  # type: ignore[arg-type]
            facts_for(FLATCAR, "6.1.0-57-amd64"), "update_engine")


def test_a_symlinked_kernel_slot_is_not_followed(tmp_path: Path) -> None:
    host = flatcar_root(tmp_path, {"a": "6.1.0-57-amd64"})
    (tmp_path / "boot/flatcar/vmlinuz-b").symlink_to("/etc/shadow")
    with pytest.raises(HostError, match="cannot read /boot/flatcar/vmlinuz-b"):
        NextBootProbe(host, Updaters(NEED_REBOOT)).next_boot(  # type: ignore[arg-type]
            facts_for(FLATCAR, "6.1.0-57-amd64"), "update_engine")


FCOS = OSInfo(id="fedora-coreos", version="31.20200505.3.0", pretty_name="Fedora CoreOS", coreos_family=True)


def test_rpm_ostree_next_boot_from_the_staged_deployment(tmp_path: Path) -> None:
    records = json.loads((FIXTURES / "rpm-ostree-status-staged.json").read_text())["deployments"]
    staged = rpm_ostree.next_deployment(records)
    assert staged is not None
    modules = tmp_path / str(staged.root).lstrip("/") / "usr/lib/modules"
    (modules / "5.6.13-300.fc32.x86_64").mkdir(parents=True)
    (modules / "5.6.13-300.fc32.x86_64/vmlinuz").write_bytes(b"kernel")
    (tmp_path / "run/ostree").mkdir(parents=True)
    (tmp_path / "run/ostree/staged-deployment").write_text("{}")
    updaters = Updaters(records=records)
    probe = NextBootProbe(HostRoot(tmp_path), updaters)  # type: ignore[arg-type]
    nb = probe.next_boot(facts_for(FCOS, "5.6.8-300.fc32.x86_64"), "rpm-ostree")
    assert nb is not None and nb.os_key == "fedora-coreos-31.20200517.3.0-5.6.13-300.fc32.x86_64"
    # nothing changed on disk: rpm-ostreed (which exits when idle) is not woken up again
    assert probe.next_boot(facts_for(FCOS, "5.6.8-300.fc32.x86_64"), "rpm-ostree") == nb
    assert updaters.asked == 1
    # the staged deployment is finalized away (say, `rpm-ostree cleanup -p`): asked again, nothing next
    (tmp_path / "run/ostree/staged-deployment").unlink()
    updaters.records = [r for r in records if not r.get("staged")]
    assert probe.next_boot(facts_for(FCOS, "5.6.8-300.fc32.x86_64"), "rpm-ostree") is None
    assert updaters.asked == 2


def test_the_updater_follows_the_os() -> None:
    assert source_for(FLATCAR, "auto") == "update_engine"
    assert source_for(FCOS, "auto") == "rpm-ostree"
    assert source_for(OSInfo("debian", "12", "Debian", False), "auto") == "kernel-postinst"
    assert source_for(OSInfo("debian", "12", "Debian", False), "rpm-ostree") == "rpm-ostree"


def test_status_shows_the_next_boot() -> None:
    snap = Snapshot(next_boot={"os_key": "flatcar-3815.2.1-6.6.21-flatcar", "kernel": "6.6.21-flatcar",
                               "source": "update_engine", "state": "missing", "tree": "/opt/nvidia/x",
                               "detail": "no image yet: not found"})
    text = render_text(json.loads(json.dumps(snap.to_json())))
    assert "next boot:   missing: flatcar-3815.2.1-6.6.21-flatcar (from update_engine)" in text
    assert "no image yet: not found" in text
    assert "next boot" not in render_text(json.loads(json.dumps(Snapshot().to_json())))


@pytest.mark.parametrize(("staged", "kept"), [
    ("/opt/nvidia/535.1/flatcar-1-6.1", "/opt/nvidia/535.1/flatcar-1-6.1"),
    ("opt/nvidia/x", None), ("/opt/nvidia/../etc", None), ("/opt//nvidia", None), (7, None),
])
def test_a_staged_tree_from_the_state_file_is_trusted_only_as_an_absolute_normal_path(
        tmp_path: Path, staged: object, kept: str | None) -> None:
    (tmp_path / "state.json").write_text(json.dumps({"staged": staged}))
    assert load_state(tmp_path / "state.json").staged == kept


def test_staging_yields_to_a_hidden_overlay_at_most_once_a_second() -> None:
    stop = Cancel()
    shown = [True]
    calls: list[int] = []

    def overlay_shown() -> bool:
        calls.append(1)
        return shown[0]

    preempt = _Preempt(stop, overlay_shown)
    assert not preempt() and calls == [], "not looked at again within a second"
    preempt._checked -= 2
    assert not preempt() and len(calls) == 1
    shown[0] = False
    preempt._checked -= 2
    assert preempt(), "a hidden overlay stops the download"
    stop.request()
    assert preempt(), "a stop always does"
