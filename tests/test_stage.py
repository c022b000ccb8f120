"""Issue 9 on a sandboxed Flatcar host: update_engine (a stand-in speaking its real interface on a
private system bus) says an update waits for a reboot; the agent installs the next boot's driver
beside the current one without activating it; after the "reboot" (new kernel, new OS version)
the registry is gone and the agent is READY from the staged tree without a request."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.state import STATE_FILE, load_state, read_marker
from support.flatcar import (
    FLATCAR,
    MOCK,
    NEW,
    OLD,
    bzimage_head,
    flatcar_tree,
    push_flatcar,
    reboot_into,
    update_written,
)
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, K2, Host, write
from tests.support.bus import private_system_bus, update_engine_stand_in

pytestmark = pytest.mark.integration


@pytest.fixture
def update_engine(tmp_path: Path) -> Iterator[Any]:
    pytest.importorskip("dbusmock")
    bus_dir = tmp_path / "bus"
    bus_dir.mkdir()
    with private_system_bus(bus_dir), update_engine_stand_in() as obj:
        yield obj


@pytest.fixture
def flatcar(host: Host) -> Host:
    write(host.root / "etc/os-release", FLATCAR)
    write(host.root / "boot/flatcar/vmlinuz-a", bzimage_head(K1))
    return host


def announce_update(host: Host, update_engine: Any) -> None:
    """update_engine wrote NEW's kernel (K2) into slot b and waits for the reboot."""
    update_written(host, K2)
    update_engine.SetStatus(1700000000, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", NEW, 1, dbus_interface=MOCK)


def test_the_next_boots_driver_is_staged_and_the_new_os_boots_offline(
        tmp_path: Path, registry: RegistryServer, flatcar: Host, update_engine: Any) -> None:
    host = flatcar
    push_flatcar(tmp_path, registry.host, K1, OLD)
    staged_digest = push_flatcar(tmp_path, registry.host, K2, NEW)
    first = host.once()
    assert first.returncode == 0, first.stdout + first.stderr
    assert host.current() == f"{DRIVER}/flatcar-{OLD}-{K1}"
    assert not re.search(r" next_boot_\w+ ", first.stdout), "nothing staged yet: nothing to say"

    # update_engine wrote the new OS and its kernel into slot b, and waits for the reboot
    announce_update(host, update_engine)
    second = host.once()
    assert second.returncode == 0, second.stdout + second.stderr
    assert " next_boot_ready " in second.stdout and " staging_pulling " in second.stdout, second.stdout
    staged = host.root / flatcar_tree(K2, NEW).lstrip("/")
    assert (staged / f"lib/modules/{K2}/nvidia.ko").is_file()
    assert host.current() == f"{DRIVER}/flatcar-{OLD}-{K1}", "staging must not activate the next boot's tree"
    marker = read_marker(staged)
    assert marker is not None and marker.digest == staged_digest and marker.kernel == K2

    # the reboot: new kernel, new OS version, and no registry at all
    registry.stop()
    reboot_into(host, K2, NEW, "b")
    update_engine.ResetStatus()
    third = host.once()
    assert third.returncode == 0, third.stdout + third.stderr
    for event in (" resolving ", " pulling ", " staging_"):
        assert event not in third.stdout, f"the first boot of the new OS asked the registry: {third.stdout}"
    assert host.current() == f"{DRIVER}/flatcar-{NEW}-{K2}"
    assert load_state(host.root / STATE_FILE.lstrip("/")).staged is None, "booted: no longer a staged tree"
    # the previous boot's tree stays for a rollback to the old OS
    assert (host.root / flatcar_tree(K1, OLD).lstrip("/")).is_dir()


def test_an_image_not_published_yet_is_missing_and_the_host_stays_ready(
        tmp_path: Path, registry: RegistryServer, flatcar: Host, update_engine: Any) -> None:
    host = flatcar
    push_flatcar(tmp_path, registry.host, K1, OLD)
    announce_update(host, update_engine)
    out = host.once()
    assert out.returncode == 0, out.stdout + out.stderr
    assert " next_boot_missing " in out.stdout, out.stdout
    assert f"flatcar-{NEW}-{K2}" in out.stdout
    assert not (host.root / flatcar_tree(K2, NEW).lstrip("/")).exists()
    assert host.current() == f"{DRIVER}/flatcar-{OLD}-{K1}"
    # published later: the next pass stages it
    push_flatcar(tmp_path, registry.host, K2, NEW)
    again = host.once()
    assert again.returncode == 0 and " next_boot_ready " in again.stdout, again.stdout + again.stderr
    assert (host.root / flatcar_tree(K2, NEW).lstrip("/")).is_dir()


def test_without_update_engine_the_host_is_ready_and_the_problem_is_said(
        tmp_path: Path, registry: RegistryServer, flatcar: Host) -> None:
    """No updater on the bus (here: no bus at all): a warning, never a failed boot."""
    push_flatcar(tmp_path, registry.host, K1, OLD)
    out = flatcar.once(env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert " next_boot_failed " in out.stdout and "update_engine" in out.stdout, out.stdout


def test_the_staged_tree_survives_pruning_until_the_update_is_withdrawn(
        tmp_path: Path, registry: RegistryServer, flatcar: Host, update_engine: Any) -> None:
    """install.keep_trees = 1: the running tree and the staged one both stay; once update_engine no
    longer has an update waiting, the staged tree is an ordinary old tree again and goes."""
    host = flatcar
    host.configure(registry.host, extra="[install]\nkeep_trees = 1\n")
    push_flatcar(tmp_path, registry.host, K1, OLD)
    push_flatcar(tmp_path, registry.host, K2, NEW)
    assert host.once().returncode == 0
    announce_update(host, update_engine)
    staged = host.root / flatcar_tree(K2, NEW).lstrip("/")
    for _ in range(2):  # the pass that stages, then one that prunes with it in place
        out = host.once()
        assert out.returncode == 0, out.stdout + out.stderr
        assert staged.is_dir(), out.stdout
        assert load_state(host.root / STATE_FILE.lstrip("/")).staged == flatcar_tree(K2, NEW)
    update_engine.ResetStatus()
    for _ in range(2):  # the pass that lets go of it, then one that prunes
        out = host.once()
        assert out.returncode == 0, out.stdout + out.stderr
    assert load_state(host.root / STATE_FILE.lstrip("/")).staged is None
    assert not staged.exists(), "a withdrawn update's tree is pruned like any old tree"
    assert host.current() == f"{DRIVER}/flatcar-{OLD}-{K1}"


def test_a_ready_host_polled_often_does_not_rewrite_its_state(
        tmp_path: Path, registry: RegistryServer, flatcar: Host, update_engine: Any) -> None:
    """update.poll_s makes ready passes frequent: the state file changes only when its content does."""
    push_flatcar(tmp_path, registry.host, K1, OLD)
    assert flatcar.once().returncode == 0
    state = flatcar.root / STATE_FILE.lstrip("/")
    before = (state.stat().st_mtime_ns, state.read_bytes())
    out = flatcar.once()
    assert out.returncode == 0, out.stdout + out.stderr
    assert (state.stat().st_mtime_ns, state.read_bytes()) == before


def test_the_previous_boots_tree_survives_pruning_after_the_update(
        tmp_path: Path, registry: RegistryServer, flatcar: Host, update_engine: Any) -> None:
    """install.keep_trees = 1 and the new OS booted: the old OS's tree is the previous boot's, kept
    for a rollback of the OS, pass after pass; a tree older than that goes."""
    host = flatcar
    host.configure(registry.host, extra="[install]\nkeep_trees = 1\n")
    push_flatcar(tmp_path, registry.host, K1, OLD)
    push_flatcar(tmp_path, registry.host, K2, NEW)
    assert host.once().returncode == 0
    announce_update(host, update_engine)
    assert host.once().returncode == 0
    registry.stop()
    reboot_into(host, K2, NEW, "b")
    update_engine.ResetStatus()
    for _ in range(3):
        out = host.once()
        assert out.returncode == 0, out.stdout + out.stderr
        assert (host.root / flatcar_tree(K1, OLD).lstrip("/")).is_dir(), out.stdout
    assert host.current() == f"{DRIVER}/flatcar-{NEW}-{K2}"
    assert load_state(host.root / STATE_FILE.lstrip("/")).previous_tree == flatcar_tree(K1, OLD)
