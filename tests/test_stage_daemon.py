"""Issue 9 with the daemon running on a sandboxed host: the reboot gate in front of a FleetLock
client, a kernel package's postinst hook asking for the next kernel's driver, and a shutdown that
finishes staging within its bound while a plain stop does not wait.

Real components: the agent as a process, a registry on loopback (behind a dripping proxy where a
download must take a while), update_engine and systemd stand-ins on a private system bus (their
real interfaces: GetStatus, Manager.SystemState), the hook script as shipped, run by /bin/sh."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.state import NEXT_KERNEL_FILE, read_marker
from support.flaky_proxy import Fault, FlakyProxy, blobs
from support.flatcar import MOCK, NEW, OLD, flatcar_tree, make_flatcar, push_flatcar, reboot_into, update_written
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, K2, REPO_ROOT, Host, RunningAgent, push_driver, tag, tree_path, write
from tests.support.bus import private_system_bus, update_engine_stand_in

pytestmark = pytest.mark.integration

MANAGER = "org.freedesktop.systemd1.Manager"
HOOK = REPO_ROOT / "packaging/kernel/postinst.d/nvidia-agent"
NODE = "c988d2509fdf4cdcbed39037c56406fb"


@pytest.fixture
def bus(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """update_engine and systemd (dbusmock's template, with Manager.SystemState) on a private bus."""
    dbusmock = pytest.importorskip("dbusmock")
    bus_dir = tmp_path / "bus"
    bus_dir.mkdir()
    with private_system_bus(bus_dir), update_engine_stand_in() as update_engine:
        mock, systemd = dbusmock.DBusTestCase.spawn_server_template("systemd", {}, stdout=subprocess.DEVNULL)
        try:
            systemd.AddProperty(MANAGER, "SystemState", "running", dbus_interface=MOCK)
            yield {"update_engine": update_engine, "systemd": systemd}
        finally:
            mock.terminate()
            mock.wait()


def wait_for(agent: RunningAgent, what: str, check: Any, timeout_s: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = agent.status_json()
        if status and check(status):
            return status
        if agent.proc.poll() is not None:
            break
        time.sleep(0.3)
    raise AssertionError(f"{what}: not reached; last status {json.dumps(status)[:1500]}")


def next_state(status: dict[str, Any]) -> str | None:
    nb = status.get("next_boot") or {}
    return nb.get("state")


def fleetlock(port: int, op: str) -> tuple[int, dict[str, Any]]:
    """A FleetLock client's request, as Zincati sends it."""
    import requests  # noqa: PLC0415

    body = json.dumps({"client_params": {"id": NODE, "group": "default"}}, indent=2)
    reply = requests.post(f"http://127.0.0.1:{port}/v1/{op}", data=body, timeout=30,
                          headers={"fleet-lock-protocol": "true"})
    return reply.status_code, (reply.json() if reply.content else {})


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_gate_refuses_until_staged_and_opens_after_the_hold(
        tmp_path: Path, registry: RegistryServer, host: Host, bus: dict[str, Any]) -> None:
    """A FleetLock client is refused while the next boot's image is missing, granted with a warning
    after update.hold_max_s, and granted plainly once the image is published and staged."""
    make_flatcar(host, K1)
    port = free_port()
    host.configure(registry.host, extra=f'[update]\npoll_s = 5\nhold_max_s = 6\ngate_listen = "127.0.0.1:{port}"\n')
    push_flatcar(tmp_path, registry.host, K1, OLD)
    update_written(host, K2)
    bus["update_engine"].SetStatus(1700000000, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", NEW, 1,
                                   dbus_interface=MOCK)
    with RunningAgent(host) as agent:
        wait_for(agent, "next boot missing", lambda s: next_state(s) == "missing")
        code, error = fleetlock(port, "pre-reboot")
        assert code == 409 and error["kind"] == "nvidia_driver_missing", error
        assert f"flatcar-{NEW}-{K2}" in error["value"]
        shown = agent.status().stdout
        assert "reboot gate: 127.0.0.1:" in shown and "refused" in shown, shown
        assert fleetlock(port, "steady-state") == (200, {})
        time.sleep(6)
        assert fleetlock(port, "pre-reboot") == (200, {}), "held hold_max_s: the gate opens"

        push_flatcar(tmp_path, registry.host, K2, NEW)
        code, error = fleetlock(port, "pre-reboot")
        if code != 200:  # a new hold began: the pre-reboot waits for the staging
            assert error["kind"] in ("nvidia_driver_missing", "nvidia_driver_staging"), error
        wait_for(agent, "next boot staged", lambda s: next_state(s) == "ready")
        assert fleetlock(port, "pre-reboot") == (200, {})
        code, log = agent.stop()
    assert code == 0, log
    assert "gate_refused" in log and "gate_granted" in log, log
    opened = [line for line in log.splitlines() if "gate_granted" in line and "hold_max_s" in line]
    assert opened and " warning gate_granted " in opened[0], "granted after the hold: a warning"
    assert (host.root / flatcar_tree(K2, NEW).lstrip("/")).is_dir()


def hook_env(host: Host, tmp_path: Path) -> dict[str, str]:
    """PATH with `nvidia-agent` as a host would have it, bound to the sandboxed root."""
    bin_dir = tmp_path / "bin"
    write(bin_dir / "nvidia-agent", f'#!/bin/sh\ncd {REPO_ROOT} && exec {sys.executable} -m agent '
                                    f'--root {host.root} "$@"\n').chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run_hook(env: dict[str, str], release: str) -> subprocess.CompletedProcess[str]:
    """As a kernel package's postinst runs it: run-parts passes the release (and the image path)."""
    return subprocess.run(["/bin/sh", str(HOOK), release, f"/boot/vmlinuz-{release}"], capture_output=True,
                          text=True, env=env, timeout=60, check=False)


def test_a_kernel_packages_hook_stages_its_driver_and_the_new_kernel_boots_offline(
        tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    push_driver(tmp_path, registry.host, K1)
    digest = push_driver(tmp_path, registry.host, K2)
    env = hook_env(host, tmp_path)
    stopped = run_hook(env, K2)
    assert stopped.returncode == 0, "no agent running: the kernel's installation still succeeds"
    assert "installed at its first boot" in stopped.stderr, stopped.stderr
    with RunningAgent(host) as agent:
        wait_for(agent, "ready", lambda s: s["phase"] == "ready")
        (host.root / f"lib/modules/{K2}").mkdir(parents=True)  # what the package unpacked before its postinst
        hooked = run_hook(env, K2)
        assert hooked.returncode == 0, hooked.stdout + hooked.stderr
        assert f"the next boot runs {K2}" in hooked.stdout, hooked.stdout
        out = subprocess.run(["nvidia-agent", "stage", "--kernel", K2, "--wait", "60"], capture_output=True,
                             text=True, env=env, timeout=90, check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "next boot: ready" in out.stdout, out.stdout
        for kernel, why in (("../../etc", "a release as uname -r prints it"), (K1, "is the running kernel"),
                            ("6.1.0-99-amd64", "is not installed here")):
            bad = subprocess.run(["nvidia-agent", "stage", "--kernel", kernel], capture_output=True, text=True,
                                 env=env, timeout=60, check=False)
            assert bad.returncode == 1 and why in bad.stderr, (kernel, bad.stderr)
        code, log = agent.stop()
    assert code == 0, log
    assert f"stage_requested next_kernel={K2}" in log, log
    staged = host.root / tree_path(K2).lstrip("/")
    marker = read_marker(staged)
    assert marker is not None and marker.digest == digest
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}", "staged, not activated"
    assert (host.root / NEXT_KERNEL_FILE.lstrip("/")).read_text() == f"{K2}\n", "kept on disk across restarts"
    with RunningAgent(host) as agent:  # a restart: the next boot is still known
        status = wait_for(agent, "next boot known again", lambda s: next_state(s) == "ready")
        assert status["next_boot"]["kernel"] == K2 and status["next_boot"]["source"] == "kernel-postinst"
        assert agent.stop()[0] == 0

    registry.stop()
    host.set_kernel(K2)
    first = host.once()
    assert first.returncode == 0, first.stdout + first.stderr
    for event in (" resolving ", " pulling "):
        assert event not in first.stdout, f"the first boot of {K2} asked the registry: {first.stdout}"
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K2}"
    assert not (host.root / NEXT_KERNEL_FILE.lstrip("/")).exists(), "booted: nothing to stage"
    assert tag(K2) in (host.root / tree_path(K2).lstrip("/") / ".nvidia-agent.json").read_text()


def test_stage_is_refused_where_the_updater_says_what_boots_next(
        tmp_path: Path, registry: RegistryServer, host: Host, bus: dict[str, Any]) -> None:
    make_flatcar(host, K1)
    push_flatcar(tmp_path, registry.host, K1, OLD)
    env = hook_env(host, tmp_path)
    with RunningAgent(host) as agent:
        wait_for(agent, "ready", lambda s: s["phase"] == "ready")
        out = subprocess.run(["nvidia-agent", "stage", "--kernel", K2], capture_output=True, text=True, env=env,
                             timeout=60, check=False)
        assert out.returncode == 1 and "update_engine" in out.stderr, out.stderr
        assert run_hook(env, K2).returncode == 0, "the hook itself never fails a kernel's installation"
        assert agent.stop()[0] == 0


@pytest.fixture
def slow_registry(registry: RegistryServer) -> Iterator[FlakyProxy]:
    """The registry behind a proxy that sends blobs at 512 KiB/s: a 6 MiB layer takes ~12 s."""
    with FlakyProxy(registry.host, faults=(Fault.drip(bytes_per_s=512 * 1024, when=blobs),)) as proxy:
        yield proxy


def start_staging(tmp_path: Path, registry: RegistryServer, proxy: FlakyProxy, host: Host, *,
                  bus: dict[str, Any], finish_s: float) -> RunningAgent:
    make_flatcar(host, K1)
    host.configure(proxy.host, extra=f"[update]\npoll_s = 5\nfinish_s = {finish_s}\n")
    push_flatcar(tmp_path, registry.host, K1, OLD)
    push_flatcar(tmp_path, registry.host, K2, NEW, big_lib_bytes=6 * 1024 * 1024)
    update_written(host, K2)
    bus["update_engine"].SetStatus(1700000000, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", NEW, 1,
                                   dbus_interface=MOCK)
    agent = RunningAgent(host)
    wait_for(agent, "staging", lambda s: s["phase"] == "ready" and next_state(s) == "staging")
    return agent


def stop_at_shutdown(agent: RunningAgent, bus: dict[str, Any]) -> tuple[int, str, float]:
    """SIGTERM while systemd says the system is going down: (exit status, log, seconds the stop took)."""
    bus["systemd"].UpdateProperties(MANAGER, {"SystemState": "stopping"}, dbus_interface=MOCK)
    started = time.monotonic()
    code, log = agent.stop()
    return code, log, time.monotonic() - started


def test_a_reboot_while_staging_finishes_it_and_the_new_os_boots_offline(
        tmp_path: Path, registry: RegistryServer, slow_registry: FlakyProxy, host: Host,
        bus: dict[str, Any]) -> None:
    with start_staging(tmp_path, registry, slow_registry, host, bus=bus, finish_s=90) as agent:
        code, log, took = stop_at_shutdown(agent, bus)
    assert code == 0, log
    assert "finishing_next_boot" in log and "next_boot_finished" in log and "state=ready" in log, log
    assert took > 2, f"the stop returned in {took:.1f}s: it cannot have finished a ~12 s download"
    assert "staging_pulling" in log.split("finishing_next_boot")[0], "the staging was in flight at the stop"
    staged = host.root / flatcar_tree(K2, NEW).lstrip("/")
    assert read_marker(staged) is not None, log

    registry.stop()
    reboot_into(host, K2, NEW, "b")
    bus["update_engine"].ResetStatus()
    after = host.once()
    assert after.returncode == 0, after.stdout + after.stderr
    for event in (" resolving ", " pulling ", " staging_"):
        assert event not in after.stdout, f"the first boot of the new OS asked the registry: {after.stdout}"
    assert host.current() == f"{DRIVER}/flatcar-{NEW}-{K2}"


def test_a_restart_while_staging_does_not_wait(
        tmp_path: Path, registry: RegistryServer, slow_registry: FlakyProxy, host: Host,
        bus: dict[str, Any]) -> None:
    with start_staging(tmp_path, registry, slow_registry, host, bus=bus, finish_s=90) as agent:
        store = host.root / "var/cache/nvidia-agent/blobs/sha256"
        deadline = time.monotonic() + 30
        while not any(p.stat().st_size for p in store.glob("*.partial")) and time.monotonic() < deadline:
            time.sleep(0.2)  # some of the big layer is on disk: there is something to resume
        started = time.monotonic()
        code, log = agent.stop()  # SystemState "running": a systemctl stop or restart
        took = time.monotonic() - started
    assert code == 0, log
    assert took < 8, f"a plain stop waited {took:.1f}s"
    assert "finishing_next_boot" not in log, log
    assert read_marker(host.root / flatcar_tree(K2, NEW).lstrip("/")) is None
    partial = list((host.root / "var/cache/nvidia-agent/blobs/sha256").glob("*.partial"))
    assert partial, "the interrupted download stays in the content store"
    slow_registry.seen.clear()
    again = host.once()  # the next start resumes that download, then cleans up
    assert again.returncode == 0 and " next_boot_ready " in again.stdout, again.stdout + again.stderr
    resumed = [s for s in slow_registry.seen if s.range and partial[0].name.removesuffix(".partial") in s.path]
    assert resumed and resumed[0].range.startswith("bytes=") and not resumed[0].range.startswith("bytes=0-"), \
        [(s.path, s.range) for s in slow_registry.seen]
    assert host.debris() == []
    assert not list((host.root / "var/cache/nvidia-agent/blobs/sha256").iterdir()), "installed: its blobs go"


def test_the_bound_cuts_a_staging_that_cannot_finish(
        tmp_path: Path, registry: RegistryServer, slow_registry: FlakyProxy, host: Host,
        bus: dict[str, Any]) -> None:
    with start_staging(tmp_path, registry, slow_registry, host, bus=bus, finish_s=2) as agent:
        code, log, took = stop_at_shutdown(agent, bus)
    assert code == 0, log
    assert "next_boot_unfinished" in log and "update.finish_s ran out" in log, log
    assert took < 2 + 5 + 3, f"the stop took {took:.1f}s for a 2 s bound"
    assert read_marker(host.root / flatcar_tree(K2, NEW).lstrip("/")) is None


def test_a_reboot_stages_what_the_last_pass_could_not(
        tmp_path: Path, registry: RegistryServer, host: Host, bus: dict[str, Any]) -> None:
    """The image was missing at the last pass and is published since: the stop at shutdown stages it
    itself (a pass of its own, only the next boot), and the new OS boots offline."""
    make_flatcar(host, K1)
    # the next pass would come in check_interval_s (300 s): only the stop can stage it in this test
    host.configure(registry.host, extra="[update]\npoll_s = 3600\nfinish_s = 60\n")
    push_flatcar(tmp_path, registry.host, K1, OLD)
    update_written(host, K2)
    bus["update_engine"].SetStatus(1700000000, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", NEW, 1,
                                   dbus_interface=MOCK)
    with RunningAgent(host) as agent:
        wait_for(agent, "missing", lambda s: next_state(s) == "missing")
        push_flatcar(tmp_path, registry.host, K2, NEW)  # published; the agent would look again in an hour
        bus["systemd"].UpdateProperties(MANAGER, {"SystemState": "stopping"}, dbus_interface=MOCK)
        code, log = agent.stop()
    assert code == 0, log
    assert "finishing_next_boot" in log and "state=missing" in log and "next_boot_finished" in log, log
    assert read_marker(host.root / flatcar_tree(K2, NEW).lstrip("/")) is not None
    registry.stop()
    reboot_into(host, K2, NEW, "b")
    bus["update_engine"].ResetStatus()
    after = host.once()
    assert after.returncode == 0 and " pulling " not in after.stdout, after.stdout + after.stderr
    assert host.current() == f"{DRIVER}/flatcar-{NEW}-{K2}"


def test_update_engines_signal_stages_at_once_without_waiting_for_the_poll(
        tmp_path: Path, registry: RegistryServer, host: Host, bus: dict[str, Any]) -> None:
    """update.poll_s is an hour: the StatusUpdate signal (emitted by the stand-in as update_engine
    does) wakes the agent, which stages within seconds."""
    make_flatcar(host, K1)
    host.configure(registry.host, extra="[update]\npoll_s = 3600\n")
    push_flatcar(tmp_path, registry.host, K1, OLD)
    push_flatcar(tmp_path, registry.host, K2, NEW)
    with RunningAgent(host) as agent:
        status = wait_for(agent, "ready", lambda s: s["phase"] == "ready")
        assert status.get("next_boot") is None
        update_written(host, K2)
        # anyone may send a signal on the system bus: one not from update_engine's name is not heard
        spoof = subprocess.run(
            ["dbus-send", f"--bus={os.environ['DBUS_SYSTEM_BUS_ADDRESS']}", "--type=signal", "/com/coreos/update1",
             "com.coreos.update1.Manager.StatusUpdate", "int64:1", "double:0", "string:UPDATE_STATUS_IDLE",
             "string:0.0.0", "int64:0"], capture_output=True, text=True, timeout=30, check=False)
        assert spoof.returncode == 0, spoof.stderr
        time.sleep(2)
        bus["update_engine"].SetStatus(1700000000, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", NEW, 1,
                                       dbus_interface=MOCK)
        # the next pass without the signal: check_interval_s (300 s) away
        wait_for(agent, "staged", lambda s: next_state(s) == "ready", timeout_s=30)
        code, log = agent.stop()
    assert code == 0, log
    assert "update_status_changed operation=UPDATE_STATUS_UPDATED_NEED_REBOOT" in log, log
    assert "update_status_changed operation=UPDATE_STATUS_IDLE" not in log, "the spoofed signal was heard"


def test_a_ready_host_re_checked_often_always_reads_ready(
        tmp_path: Path, registry: RegistryServer, host: Host, bus: dict[str, Any]) -> None:
    """update.poll_s = 5: a re-check every 5 s goes through detecting, units and a no-op load;
    `status` (and so its exit code, STATUS= and the gate) reads ready throughout: ready since
    the first pass, not since the last re-check."""
    make_flatcar(host, K1)
    host.configure(registry.host, extra="[update]\npoll_s = 5\n")
    push_flatcar(tmp_path, registry.host, K1, OLD)
    with RunningAgent(host) as agent:
        first = wait_for(agent, "ready", lambda s: s["phase"] == "ready")
        phases = set()
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline:
            phases.add(str(agent.status_json().get("phase")))
        last = agent.status_json()
        assert agent.stop()[0] == 0
    assert phases == {"ready"}, phases
    assert (last.get("last_reconcile_at") or 0) > (first.get("last_reconcile_at") or 0) + 5, "no re-check ran"
    assert last["phase_since"] == first["phase_since"], "a re-check left ready for a moment"
