"""VM tier, issue 8: the agent as a system extension on a host that looks like CoreOS.

The guest (harness variants `fcos` and `flatcar`) has no python3 at all, mounts /usr read-only,
and has /usr/local -> /var/usrlocal as Fedora CoreOS does. The agent is on it only as the image
packaging/build-sysext builds, placed by the Ignition config packaging/deploy/<variant>.ign (applied
as Ignition's files stage writes it) and merged at boot by the real systemd-sysext.service. For
`flatcar` the guest also gets what Flatcar itself ships for extensions (systemd-sysext.service
enabled, its ensure-sysext.service); the `fcos` recipe brings that unit itself.

fcos, in order (each also works alone):
1. first boot: pull, install, load, READY, kubelet after the driver, nvidia-smi by name;
2. `systemd-sysext refresh` under the running agent: the overlay is back within seconds, the
   same agent process answers `status`;
3. an unchanged reboot with the registry masked: READY from what is installed, nothing pulled;
4. a reboot into the other kernel: the image for it is pulled and serves.
flatcar: the first boot from the Flatcar recipe.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import harness
from tests.vm.harness import DRIVER, Guest
from tests.vm.test_vm import (
    artifacts_dir,
    assert_ordered,
    assert_serving,
    current_target,
    pulled,
    scenario,
    settle,
    tree_for,
    warnings,
)

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.timeout(1500)]

EXTENSION_IMAGE = "/opt/extensions/nvidia-agent/nvidia-agent-0.1.0-x86-64.raw"


@pytest.fixture(scope="module")
def artifacts() -> Path:
    return artifacts_dir("-sysext")


def boot(variant: str, artifacts: Path) -> Iterator[Guest]:
    harness.build_image(variant=variant)
    with Guest(kernel="amd64", name=variant, workdir=artifacts / variant, variant=variant) as g:
        g.wait_agent_active()
        yield g
    if os.environ.get("NVIDIA_AGENT_VM_KEEP_DISK") != "1":
        g.disk.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def fcos(artifacts: Path) -> Iterator[Guest]:
    yield from boot("fcos", artifacts)


@pytest.fixture
def vm(fcos: Guest, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    yield from scenario(fcos, artifacts, request)


def assert_coreos_like(g: Guest) -> None:
    """No Python on the host, /usr read-only, the agent only from the merged extension."""
    rc, out = g.run("command -v python3 python3.11 python; ls -d /usr/bin/python* /usr/lib/python3* 2>/dev/null",
                    quiet=True)
    assert rc != 0 and out.strip() == "", f"python on the CoreOS-like guest: {out!r}"
    rc, out = g.run("findmnt -n -o OPTIONS --mountpoint /usr | head -1; touch /usr/.probe", quiet=True)
    assert rc != 0 and out.split()[0].split(",")[0] == "ro", f"/usr is writable: {out}"
    _, ext = g.run("systemd-sysext status", quiet=True)
    assert any(line.split()[:2] == ["/usr", "nvidia-agent"] for line in ext.splitlines()), ext
    assert g.run("readlink /etc/extensions/nvidia-agent.raw", quiet=True)[1].strip() == EXTENSION_IMAGE
    _, exe = g.run("readlink -f /proc/$(systemctl show -P MainPID nvidia-agent)/exe", quiet=True)
    assert exe.strip() == "/usr/lib/nvidia-agent/nvidia-agent", exe
    shown = g.show("nvidia-agent", "FragmentPath")
    assert shown["FragmentPath"] in ("/usr/lib/systemd/system/nvidia-agent.service",
                                     "/lib/systemd/system/nvidia-agent.service"), shown
    assert g.run("test -e /etc/systemd/system/nvidia-agent.service", quiet=True)[0] != 0, \
        "the unit must come from the extension, not from /etc"


def test_coreos_first_boot_from_the_extension(vm: Guest) -> None:
    """First boot of a CoreOS-like host: the extension merged at boot pulls, installs, loads, READY;
    kubelet started only after it; nvidia-smi runs by name from a login shell."""
    assert vm.boots == 1, "runs on the guest's first boot"
    st = settle(vm)
    assert_coreos_like(vm)
    assert_serving(vm, st, DRIVER, vm.kernels.amd64)
    assert pulled(vm.journal()), "first boot: no `pulling` event in the journal"
    # the driver's tools went to /usr/local/bin, which is /var/usrlocal/bin here
    assert vm.run("readlink /var/usrlocal/bin/nvidia-smi", quiet=True)[1].strip() == \
        "/opt/nvidia/current/bin/nvidia-smi"
    assert_ordered(vm, driver_seen=DRIVER)
    assert warnings(vm) == "", warnings(vm)
    ensure = vm.show("ensure-sysext.service", "ActiveState", "Result")
    assert ensure == {"ActiveState": "active", "Result": "success"}, ensure


def test_coreos_sysext_refresh_keeps_the_agent(vm: Guest) -> None:
    """`systemd-sysext refresh` re-merges /usr, the agent's own files included: the same process
    keeps running, answers `status`, and puts its overlay back on top (check_interval_s is 300)."""
    settle(vm)
    lib = f"/usr/lib64/libnvidia-ml.so.{DRIVER}"
    pid = vm.show("nvidia-agent", "MainPID")["MainPID"]
    since = vm.guest_time()
    vm.run("systemd-sysext refresh", check=True)
    t0 = time.monotonic()
    while vm.run(f"test -e {lib}", quiet=True)[0] != 0 and time.monotonic() - t0 < 60:
        time.sleep(0.5)
    took = time.monotonic() - t0
    harness.timed("systemd-sysext refresh: the driver's libraries shown again (host wait)", took)
    assert vm.run(f"test -e {lib}", quiet=True)[0] == 0, vm.run("findmnt -R /usr", quiet=True)[1]
    assert took < 20, f"the overlay came back {took:.1f}s after the refresh"
    st = settle(vm, since=since)
    assert vm.show("nvidia-agent", "MainPID")["MainPID"] == pid, "the agent was restarted by the refresh"
    assert_serving(vm, st, DRIVER, vm.kernel)
    assert "overlay_hidden" in vm.journal()


def test_coreos_unchanged_reboot_without_a_registry(vm: Guest) -> None:
    """An unchanged reboot is READY from what is installed: the registry is not started, nothing is pulled."""
    settle(vm)
    before = current_target(vm)
    vm.run("systemctl disable -q docker-registry.service", check=True)
    try:
        vm.reboot()
        vm.wait_agent_active()
        st = settle(vm)
        assert vm.run("systemctl is-active docker-registry", quiet=True)[1].strip() != "active"
        journal = vm.journal()
        assert not pulled(journal), f"unchanged reboot pulled: {pulled(journal)}"
        assert "resolving" not in journal, f"an unchanged boot asked the registry:\n{journal}"
        assert warnings(vm) == "", warnings(vm)
        assert current_target(vm) == before
        assert_coreos_like(vm)
        assert_serving(vm, st, DRIVER, vm.kernels.amd64)
        assert_ordered(vm, driver_seen=DRIVER)
    finally:
        vm.run("systemctl enable -q --now docker-registry.service", check=True)


def test_coreos_kernel_changed(vm: Guest) -> None:
    """Reboot into the other kernel flavour: the extension's agent installs the image built for it."""
    settle(vm)
    old, new = vm.kernel, vm.kernels.cloud if vm.kernel != vm.kernels.cloud else vm.kernels.amd64
    vm.reboot(kernel=new)
    vm.wait_agent_active()
    st = settle(vm)
    assert st.get("kernel_changed_from") == old, st
    assert any(new in line for line in pulled(vm.journal())), pulled(vm.journal())
    assert_coreos_like(vm)
    assert_serving(vm, st, DRIVER, new)
    assert vm.run(f"test -d /opt/nvidia/{tree_for(DRIVER, old)}", quiet=True)[0] == 0


def test_flatcar_recipe_first_boot(artifacts: Path) -> None:
    """packaging/deploy/flatcar.ign on a host that merges extensions and runs ensure-sysext.service as
    Flatcar does: READY from the first boot, kubelet after it, the update timer enabled."""
    for g in boot("flatcar", artifacts):
        st = settle(g)
        assert_coreos_like(g)
        assert_serving(g, st, DRIVER, g.kernels.amd64)
        assert_ordered(g, driver_seen=DRIVER)
        assert warnings(g) == "", warnings(g)
        timer = g.show("nvidia-agent-sysupdate.timer", "UnitFileState", "ActiveState")
        assert timer == {"UnitFileState": "enabled", "ActiveState": "active"}, timer
        rc, conf = g.run("cat /etc/sysupdate.nvidia-agent.d/nvidia-agent.conf", quiet=True)
        assert rc == 0 and "CurrentSymlink=/etc/extensions/nvidia-agent.raw" in conf
        harness.log(f"flatcar status: {json.dumps(st)}")
        g.collect(artifacts / "test_flatcar_recipe_first_boot")
