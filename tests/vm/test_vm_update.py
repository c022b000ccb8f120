"""VM tier, issue 9: the next OS's driver staged before the reboot, so the first boot of the new OS
or kernel is READY with no registry at all.

Each scenario boots its own Debian guest (a fresh disk):

1. Flatcar-like: the guest says it is Flatcar (os-release), boots the amd64 kernel as slot a, and
   update_engine's stand-in (tests/vm/update_engine_standin.py: the real interface from
   update_engine.xml, on the guest's real system bus) announces UPDATE_STATUS_UPDATED_NEED_REBOOT
   for a new version whose kernel, written to /boot/flatcar/vmlinuz-b, is the cloud flavour (a
   real bzImage: the agent reads its release from the header). The agent stages; the registry is
   stopped and disabled; the guest reboots into the new kernel and version and is READY from the
   staged tree with no pull, boot-to-READY compared with an unchanged reboot measured before it.
2. Plain distribution: the real linux-image package of the cloud kernel installed with the guest's
   real dpkg runs its postinst, which runs /etc/kernel/postinst.d/nvidia-agent (installed as
   README says); the agent stages; the registry goes; the reboot into that kernel is READY offline.

3. Fedora CoreOS-like: the guest says it is Fedora CoreOS (os-release with OSTREE_VERSION), and
   rpm-ostreed's stand-in (tests/vm/rpm_ostree_standin.py: the Sysroot interface of rpm-ostree's
   org.projectatomic.rpmostree1.xml, on the guest's real system bus) lists a staged deployment of
   a new version whose /ostree/deploy/.../usr/lib/modules/<cloud>/vmlinuz is the cloud kernel;
   /run/ostree/staged-deployment appears as rpm-ostree writes it. The agent stages; the registry
   goes; the reboot into the new kernel and version is READY offline.

Not here: a reboot that interrupts staging (proven with a real process and a systemd stand-in
in tests/test_stage_daemon.py: the guest's registry is too fast to catch a staging in flight).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm import harness
from tests.vm.harness import DRIVER, Guest
from tests.vm.test_vm import OVERRIDE, artifacts_dir, assert_serving, current_target, fresh_guest, pulled, settle

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.timeout(1500)]

OLD, NEW = "3139.2.0", "3139.2.1"
FLATCAR = (harness.REPO / "tests/fixtures/os-release/flatcar-3139.2.0").read_text()
FCOS = (harness.REPO / "tests/fixtures/os-release/fedora-coreos-37").read_text()
FCOS_OLD, FCOS_NEW = "37.20230126.20.0", "37.20230205.20.0"
VM_FILES = "/usr/lib/nvidia-agent-vm"


@pytest.fixture(scope="module")
def artifacts() -> Path:
    return artifacts_dir("-update")


@pytest.fixture
def vm(artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A fresh Debian guest per scenario: each one rewrites what the guest is."""
    yield from fresh_guest(artifacts, request)


def wait_next_boot(g: Guest, kernel: str, want: str = "ready", timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        st = g.status()
        nb = (st or {}).get("next_boot") or {}
        if nb.get("kernel") == kernel and nb.get("state") == want:
            return nb
        time.sleep(2)
    _, journal = g.run("journalctl -u nvidia-agent -b --no-pager -o cat | tail -30", quiet=True)
    pytest.fail(f"next boot not {want} for {kernel}: {json.dumps((st or {}).get('next_boot'))}\n{journal}")


def asked_the_registry(journal: str) -> list[str]:
    """journal lines (-o cat) of the events that reach a registry."""
    return pulled(journal) + [line for line in journal.splitlines()
                              if re.match(r"^(<\d>)?(resolving|staging_\w+)\b", line)]


def restart_with_updater(g: Guest, unit: str, *, enable: bool = False) -> None:
    """The updater's stand-in running (`enable`: after reboots too, as update_engine is), the agent
    asking it every 5 s, restarted and ready."""
    g.put(OVERRIDE, "[update]\npoll_s = 5\n")
    g.run(f"systemctl {'enable --now' if enable else 'start'} {unit}", check=True)
    t = g.guest_time()
    g.run("systemctl restart --no-block nvidia-agent", check=True)
    settle(g, since=t)


def reboot_offline_into(g: Guest, new_os: Callable[[], None]) -> None:
    """No registry from here on; the new OS's /usr (its os-release, written by `new_os`) is in place
    when the cloud kernel boots, as an update's new partition or deployment would be."""
    g.run("systemctl disable --now docker-registry", check=True)
    g.run("systemctl stop nvidia-agent", check=True)
    new_os()
    g.reboot(kernel="cloud")


def be_flatcar(g: Guest, version: str) -> None:
    g.run("rm -f /etc/os-release", check=True)
    g.put("/etc/os-release", FLATCAR.replace(OLD, version))


def test_a_flatcar_update_is_staged_and_its_first_boot_is_ready_offline(vm: Guest) -> None:
    amd, cloud = vm.kernels.amd64, vm.kernels.cloud
    settle(vm)
    vm.tag_image("nvidia/driver", f"{DRIVER}-debian-12-{amd}", f"{DRIVER}-flatcar-{OLD}-{amd}")
    staged_digest = vm.tag_image("nvidia/driver", f"{DRIVER}-debian-12-{cloud}", f"{DRIVER}-flatcar-{NEW}-{cloud}")
    be_flatcar(vm, OLD)
    vm.run(f"mkdir -p /boot/flatcar && cp {VM_FILES}/vmlinuz-{amd} /boot/flatcar/vmlinuz-a", check=True)
    restart_with_updater(vm, "update-engine.service", enable=True)
    assert current_target(vm) == f"{DRIVER}/flatcar-{OLD}-{amd}"
    st = vm.status() or {}
    assert st.get("next_boot") is None, st.get("next_boot")

    # the baseline, in this run: an unchanged reboot
    vm.reboot()
    unchanged_s = vm.wait_agent_active()
    settle(vm)
    assert not asked_the_registry(vm.journal()), vm.journal()

    # update_engine wrote the new OS's kernel into slot b and waits for the reboot
    vm.run(f"cp {VM_FILES}/vmlinuz-{cloud} /boot/flatcar/vmlinuz-b", check=True)
    vm.put("/run/update-engine-standin.json",
           json.dumps([int(time.time()), 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", NEW, 123456789]))
    vm.run("systemctl kill -s HUP update-engine.service", check=True)  # its StatusUpdate signal
    nb = wait_next_boot(vm, cloud)
    assert nb["os_key"] == f"flatcar-{NEW}-{cloud}" and nb["source"] == "update_engine", nb
    marker = json.loads(vm.run(f"cat /opt/nvidia/{DRIVER}/flatcar-{NEW}-{cloud}/.nvidia-agent.json",
                               check=True, quiet=True)[1])
    assert marker["digest"] == staged_digest, marker
    assert current_target(vm) == f"{DRIVER}/flatcar-{OLD}-{amd}", "staged, not activated"
    rc, shown = vm.run("nvidia-agent status", quiet=True)
    assert rc == 0 and f"next boot:   ready: flatcar-{NEW}-{cloud}" in shown, shown

    reboot_offline_into(vm, lambda: be_flatcar(vm, NEW))
    assert vm.run("uname -r", quiet=True)[1].strip() == cloud
    new_s = vm.wait_agent_active()
    st = settle(vm)
    journal = vm.journal()
    assert not asked_the_registry(journal), f"the first boot of {NEW} asked the registry:\n{journal}"
    assert st["kernel"] == cloud and current_target(vm) == f"{DRIVER}/flatcar-{NEW}-{cloud}", st
    assert vm.run("systemctl is-active docker-registry", quiet=True)[1].strip() != "active"
    # a rollback to the old OS still finds its tree
    assert vm.run(f"test -d /opt/nvidia/{DRIVER}/flatcar-{OLD}-{amd}", quiet=True)[0] == 0
    # and the same kernel unchanged once more, for a like-for-like number (kernels boot at their own pace)
    vm.reboot()
    same_kernel_s = vm.wait_agent_active()
    settle(vm)
    harness.timed(f"boot-to-READY unchanged {amd} (guest clock)", unchanged_s)
    harness.timed(f"boot-to-READY new OS {NEW} on {cloud}, offline (guest clock)", new_s)
    harness.timed(f"boot-to-READY unchanged {cloud} after it (guest clock)", same_kernel_s)
    assert new_s <= 1.5 * unchanged_s, f"boot-to-READY {new_s:.1f}s vs unchanged {unchanged_s:.1f}s"
    assert new_s <= 1.5 * same_kernel_s, f"boot-to-READY {new_s:.1f}s vs unchanged {cloud} {same_kernel_s:.1f}s"


def test_a_kernel_package_stages_its_driver_and_its_first_boot_is_ready_offline(vm: Guest) -> None:
    cloud = vm.kernels.cloud
    settle(vm)
    rc, out = vm.run(f"dpkg --force-depends -i {VM_FILES}/debs/linux-base_*.deb {VM_FILES}/debs/linux-image-*.deb"
                     " 2>&1", timeout=600)
    assert f"Setting up linux-image-{cloud}" in out, out
    assert f"nvidia-agent: the next boot runs {cloud}" in out, f"the hook did not ask the agent (rc {rc}):\n{out}"
    nb = wait_next_boot(vm, cloud)
    assert nb["source"] == "kernel-postinst" and nb["os_key"] == f"debian-12-{cloud}", nb
    assert current_target(vm) == f"{DRIVER}/debian-12-{vm.kernels.amd64}", "staged, not activated"

    vm.run("systemctl disable --now docker-registry", check=True)
    vm.reboot(kernel="cloud")
    vm.wait_agent_active()
    st = settle(vm)
    journal = vm.journal()
    assert not asked_the_registry(journal), f"the first boot of {cloud} asked the registry:\n{journal}"
    assert_serving(vm, st, DRIVER, cloud)
    assert st.get("next_boot") is None, st.get("next_boot")


def be_fcos(g: Guest, version: str) -> None:
    g.run("rm -f /etc/os-release", check=True)
    g.put("/etc/os-release", FCOS.replace(FCOS_OLD, version).rstrip("\n") + "\n")  # OSTREE_VERSION included


def deployment(checksum: str, version: str, *, booted: bool, staged: bool) -> dict[str, Any]:
    """One record of Sysroot.Deployments, keys and types as rpm-ostree's interface lists them."""
    return {"id": f"fedora-coreos-{checksum}.0", "osname": "fedora-coreos", "serial": 0, "checksum": checksum,
            "version": version, "timestamp": 1675555200, "origin": "fedora:fedora/x86_64/coreos/stable",
            "booted": booted, "staged": staged, "pinned": False}


def test_an_rpm_ostree_staged_deployment_is_staged_and_its_first_boot_is_ready_offline(vm: Guest) -> None:
    amd, cloud = vm.kernels.amd64, vm.kernels.cloud
    old_key, new_key = f"fedora-coreos-{FCOS_OLD}-{amd}", f"fedora-coreos-{FCOS_NEW}-{cloud}"
    settle(vm)
    vm.tag_image("nvidia/driver", f"{DRIVER}-debian-12-{amd}", f"{DRIVER}-{old_key}")
    staged_digest = vm.tag_image("nvidia/driver", f"{DRIVER}-debian-12-{cloud}", f"{DRIVER}-{new_key}")
    be_fcos(vm, FCOS_OLD)
    booted, new = "a" * 64, "b" * 64
    vm.put("/run/rpm-ostree-standin.json", json.dumps([deployment(booted, FCOS_OLD, booted=True, staged=False)]))
    restart_with_updater(vm, "rpm-ostreed.service")
    assert current_target(vm) == f"{DRIVER}/{old_key}"

    # Zincati had rpm-ostree stage the new version: its deployment on disk, its record on the bus
    root = f"/ostree/deploy/fedora-coreos/deploy/{new}.0"
    vm.run(f"mkdir -p {root}/usr/lib/modules/{cloud} && cp {VM_FILES}/vmlinuz-{cloud} "
           f"{root}/usr/lib/modules/{cloud}/vmlinuz && mkdir -p /run/ostree && touch /run/ostree/staged-deployment",
           check=True)
    vm.put("/run/rpm-ostree-standin.json", json.dumps([deployment(new, FCOS_NEW, booted=False, staged=True),
                                                       deployment(booted, FCOS_OLD, booted=True, staged=False)]))
    nb = wait_next_boot(vm, cloud)
    assert nb["os_key"] == new_key and nb["source"] == "rpm-ostree", nb
    marker = json.loads(vm.run(f"cat /opt/nvidia/{DRIVER}/{new_key}/.nvidia-agent.json", check=True, quiet=True)[1])
    assert marker["digest"] == staged_digest, marker
    assert current_target(vm) == f"{DRIVER}/{old_key}", "staged, not activated"

    reboot_offline_into(vm, lambda: be_fcos(vm, FCOS_NEW))
    vm.wait_agent_active()
    st = settle(vm)
    journal = vm.journal()
    assert not asked_the_registry(journal), f"the first boot of {FCOS_NEW} asked the registry:\n{journal}"
    assert st["kernel"] == cloud and current_target(vm) == f"{DRIVER}/{new_key}", st
