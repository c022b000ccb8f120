"""VM tier: what an operator sees on a real Debian host (systemd PID 1, real kernel) under QEMU.

One guest, one disk, the scenarios in order (each also works alone: it brings the guest to the
state it starts from):

1. first boot: pull, install, overlay on /usr/lib64, modules in dependency order, device nodes,
   ready, nvidia-smi through /usr/lib64;
2. unchanged reboot: nothing pulled, modules loaded again, ready;
3. busy module + different driver requested: the agent refuses to unload and names the holder;
4. the real 535 driver (when built): installs and verifies, the load fails with the kernel's
   own reason, the previous driver stays current and serving, the refusal is remembered (the
   next pass does not unload the working driver again) until `systemctl reload`;
5. reboot into the other kernel flavour: the agent installs the image built for it;

and issue 4, the systemd contract, with stand-ins for kubelet and dcos-mesos-slave that record
whether the driver was there when they started (checked after 1 and after 2):

6. restart and stop/start of the agent: the driver stays loaded and mounted throughout; reload
   reconciles in the same process;
7. a wedged agent: systemd's watchdog kills and restarts it;
8. a new driver.version without an image: the installed driver serves at once after a reboot
   (READY, degraded), the new one installs without a restart when published;
9. no image for this host yet and nothing installed: kubelet starts after
   daemon.ready_timeout_s with a degraded status, and the agent becomes ready without a
   restart once the image is published;
10. a blackholed registry at boot with WatchdogSec=6s: READY on time, the watchdog never fires,
   `systemctl stop` mid-pull is a success within seconds.

Run: tests/vm/run  (or: python -m tests.vm.harness run first_boot kernel_changed).
What each scenario leaves behind (status, journal, /proc/modules, /dev/nvidia*, mountinfo, ...)
is collected under $NVIDIA_AGENT_VM_CACHE/runs/<time>/<scenario>/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm import harness
from tests.vm.harness import DRIVER, DRIVER2, STANDINS, Guest

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.timeout(1500)]

LOADABLE_MODULES = ("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm")
NVIDIA_MAJOR = 195
OVERRIDE = "/etc/nvidia-agent/config.d/60-scenario.toml"
DROPIN_LINES = ["[Unit]", "Wants=nvidia-agent.service", "After=nvidia-agent.service"]


# --------------------------------------------------------------------------- fixtures

def artifacts_dir(suffix: str = "") -> Path:
    """Where a module's scenarios leave what an operator would look at."""
    base = Path(os.environ.get("NVIDIA_AGENT_VM_ARTIFACTS", harness.CACHE / "runs"))
    d = base / (time.strftime("%Y%m%d-%H%M%S") + suffix)
    d.mkdir(parents=True, exist_ok=True)
    os.environ["NVIDIA_AGENT_VM_ARTIFACTS_USED"] = str(d)
    return d


def scenario(g: Guest, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """One scenario on a module's guest: timed, and what it left collected."""
    t = time.monotonic()
    yield g
    harness.timed(f"scenario {request.node.name}", time.monotonic() - t)
    g.collect(artifacts / request.node.name)


def fresh_guest(artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A Debian guest of its own for one scenario (one that rewrites what the guest is), booted with the
    agent active; its disk goes after it unless NVIDIA_AGENT_VM_KEEP_DISK=1."""
    harness.build_image()
    name = request.node.name.removeprefix("test_")[:40]
    with Guest(kernel="amd64", name=name, workdir=artifacts / name) as g:
        g.wait_agent_active()
        yield from scenario(g, artifacts, request)
    if os.environ.get("NVIDIA_AGENT_VM_KEEP_DISK") != "1":
        g.disk.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def artifacts() -> Path:
    return artifacts_dir()


@pytest.fixture(scope="module")
def guest(artifacts: Path) -> Iterator[Guest]:
    harness.build_image()  # a cache hit after `harness setup`: seconds
    with Guest(kernel="amd64", name="scenarios", workdir=artifacts / "guest") as g:
        g.wait_agent_active()
        yield g
    if os.environ.get("NVIDIA_AGENT_VM_KEEP_DISK") != "1":  # logs stay; the disk is ~0.2-1 GB
        g.disk.unlink(missing_ok=True)


@pytest.fixture
def vm(guest: Guest, artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    yield from scenario(guest, artifacts, request)


# --------------------------------------------------------------------------- what an operator reads

def settle(g: Guest, want: str = "ready", timeout: float = 300, since: float | None = None,
           stuck_s: float = 120) -> dict[str, Any]:
    """Wait for the agent's phase `want` (reconciled after `since`, guest clock).

    Gives up early when the agent sits in another settled phase with the same error for stuck_s:
    a scenario that cannot pass should say why at once, not after the whole timeout.
    """
    t0 = time.monotonic()
    deadline = t0 + timeout
    last: dict[str, Any] | None = None
    same_since = time.monotonic()
    while time.monotonic() < deadline:
        st = g.status()
        fresh = st is not None and (since is None or (st.get("phase_since") or 0) >= since)
        if st and fresh and st.get("phase") == want:
            harness.timed(f"agent {want}", time.monotonic() - t0)
            return st
        key = None if st is None else (st.get("phase"), json.dumps(st.get("last_error"), sort_keys=True))
        if last is None or key != (last.get("phase"), json.dumps(last.get("last_error"), sort_keys=True)):
            same_since = time.monotonic()
        elif fresh and st and st.get("phase") in ("degraded", "failed", "no-gpu", "ready") \
                and time.monotonic() - same_since > stuck_s:
            break
        last = st
        time.sleep(2)
    _, journal = g.run("journalctl -u nvidia-agent -b --no-pager -o cat | tail -40", quiet=True)
    pytest.fail(f"agent did not reach {want!r} within {time.monotonic() - t0:.0f}s; status:\n"
                f"{json.dumps(last, indent=1) if last else 'daemon unreachable'}\njournal tail:\n{journal}")


def error_text(st: dict[str, Any]) -> str:
    err = st.get("last_error") or {}
    return "\n".join([err.get("message") or "", err.get("hint") or "", *(err.get("causes") or [])])


def proc_modules(g: Guest) -> dict[str, list[str]]:
    """/proc/modules: name -> the modules using it."""
    _, out = g.run("cat /proc/modules", quiet=True)
    mods = {}
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 4:
            mods[f[0]] = [u for u in f[3].split(",") if u and u != "-"]
    return mods


def module_versions(g: Guest) -> dict[str, str]:
    _, out = g.run("for m in /sys/module/nvidia*; do [ -e $m/version ] && echo ${m##*/} $(cat $m/version); done; true",
                   quiet=True)
    return dict(line.split(None, 1) for line in out.splitlines() if " " in line)


def char_devices(g: Guest) -> dict[str, int]:
    _, out = g.run("cat /proc/devices", quiet=True)
    majors: dict[str, int] = {}
    section = ""
    for line in out.splitlines():
        if line.endswith(":"):
            section = line
        elif section.startswith("Character") and line.split():
            num, name = line.split(None, 1)
            majors.setdefault(name, int(num))
    return majors


def device_nodes(g: Guest) -> dict[str, tuple[str, int, int]]:
    _, out = g.run("stat -c '%n|%F|%t|%T' /dev/nvidia* 2>/dev/null; true", quiet=True)
    nodes = {}
    for line in out.splitlines():
        name, kind, major, minor = line.split("|")
        nodes[name] = (kind, int(major, 16), int(minor, 16))
    return nodes


def current_target(g: Guest) -> str:
    return g.run("readlink /opt/nvidia/current", quiet=True)[1].strip()


def tree_for(driver: str, kernel: str) -> str:
    return f"{driver}/debian-12-{kernel}"


def pulled(journal: str) -> list[str]:
    """journal lines (-o cat) of `pulling` events."""
    return [line for line in journal.splitlines() if re.match(r"^(<\d>)?pulling\b", line)]


def set_driver(g: Guest, version: str | None) -> float:
    """Request a driver version (None: back to the guest's default) and restart the agent.

    Returns the guest's clock before the restart, for `settle(since=...)`.
    """
    if version is None:
        g.run(f"rm -f {OVERRIDE}", check=True)
    else:
        g.run(f"printf '[driver]\\nversion = \"{version}\"\\n' > {OVERRIDE}", check=True)
    t = g.guest_time()
    # --no-block: a Type=notify unit that cannot get ready would hold `restart` until its timeout
    g.run("systemctl restart --no-block nvidia-agent", check=True)
    return t


def assert_serving(g: Guest, st: dict[str, Any], driver: str, kernel: str) -> None:
    """The acceptance of a working node, as an operator checks it."""
    assert st["phase"] == "ready", st
    assert st["driver"] == driver, st
    assert st["kernel"] == kernel, st
    assert g.run("nvidia-agent status", quiet=True)[0] == 0
    assert g.run("systemctl is-active nvidia-agent", quiet=True)[1].strip() == "active"
    # installed and current
    assert current_target(g) == tree_for(driver, kernel)
    # the overlay on /usr/lib64 shows the tree's libraries
    rc, out = g.run("findmnt -n -o FSTYPE,OPTIONS --mountpoint /usr/lib64", quiet=True)
    mounts = out.strip().splitlines()
    assert rc == 0 and mounts and mounts[-1].split()[0] == "overlay", f"no overlay on /usr/lib64: {out}"
    assert len(mounts) == 1, f"overlays stacked on /usr/lib64: {mounts}"
    assert f"/opt/nvidia/{driver}/" in out or "/opt/nvidia/current" in out, out
    assert g.run(f"test -e /usr/lib64/libnvidia-ml.so.{driver}", quiet=True)[0] == 0
    # modules loaded in dependency order: the kernel shows who uses whom
    mods = proc_modules(g)
    missing = [m for m in LOADABLE_MODULES if m not in mods]
    assert not missing, f"not loaded: {missing}; /proc/modules has {sorted(mods)}"
    assert {"nvidia_uvm", "nvidia_modeset"} <= set(mods["nvidia"]), mods["nvidia"]
    assert "nvidia_drm" in mods["nvidia_modeset"], mods["nvidia_modeset"]
    versions = module_versions(g)
    assert all(versions.get(m) == driver for m in LOADABLE_MODULES), versions
    assert {k: v for k, v in (st.get("modules") or {}).items() if k in LOADABLE_MODULES} \
        == dict.fromkeys(LOADABLE_MODULES, driver), st.get("modules")
    # device nodes, numbered as the driver's
    nodes = device_nodes(g)
    uvm = char_devices(g).get("nvidia-uvm")
    want = {"/dev/nvidiactl": (NVIDIA_MAJOR, 255), "/dev/nvidia0": (NVIDIA_MAJOR, 0),
            "/dev/nvidia1": (NVIDIA_MAJOR, 1), "/dev/nvidia-modeset": (NVIDIA_MAJOR, 254),
            "/dev/nvidia-uvm": (uvm, 0), "/dev/nvidia-uvm-tools": (uvm, 1)}
    assert uvm is not None, "no nvidia-uvm in /proc/devices"
    for path, (major, minor) in want.items():
        assert path in nodes, f"{path} missing; have {sorted(nodes)}"
        assert nodes[path] == ("character special file", major, minor), (path, nodes[path])
    # nvidia-smi from the tree, resolving libnvidia-ml through /usr/lib64
    rc, ldd = g.run("ldd /opt/nvidia/current/bin/nvidia-smi", quiet=True)
    assert "/usr/lib64/libnvidia-ml.so.1" in ldd, ldd
    rc, smi = g.run("/opt/nvidia/current/bin/nvidia-smi")
    assert rc == 0 and driver in smi, smi
    # and by name from a login shell (install.bin_dir "auto": /usr/local/bin on Debian)
    rc, smi = g.run("su - -c nvidia-smi", quiet=True)
    assert rc == 0 and driver in smi, smi


def seen(g: Guest, unit: str) -> dict[str, str]:
    """What a stand-in recorded when it last started (its last line in /var/log/<unit>.seen)."""
    _, out = g.run(f"tail -n 1 /var/log/{unit}.seen", quiet=True)
    f = out.split()
    assert f and re.match(r"^\d+\.\d+$", f[0]), f"{unit} left no record: {out!r}"
    return {"uptime": f[0], **dict(kv.split("=", 1) for kv in f[1:] if "=" in kv)}


def warnings(g: Guest, since: str = "-b") -> str:
    """`journalctl -u nvidia-agent -p warning`: what an operator reads for problems."""
    return g.run(f"journalctl -u nvidia-agent {since} -p warning --no-pager -o cat", quiet=True)[1].strip()


def status_text(g: Guest) -> str:
    return g.show("nvidia-agent", "StatusText").get("StatusText", "")


def assert_ordered(g: Guest, driver_seen: str | None) -> dict[str, float]:
    """The stand-ins started only after nvidia-agent was active (READY), by systemd's own clock.

    driver_seen: the nvidia version each stand-in must have found loaded (with /dev/nvidiactl and
    /dev/nvidia0) when it started; None: no expectation. Returns the timestamps (guest monotonic s).
    """
    for unit in STANDINS:  # systemd starts them right after READY; give the job a moment
        g.run(f"for i in $(seq 120); do systemctl is-active -q {unit} && break; sleep 0.5; done", quiet=True,
              timeout=90)
    agent = g.show("nvidia-agent", "ActiveState", "ExecMainStartTimestampMonotonic",
                   "ActiveEnterTimestampMonotonic")
    assert agent["ActiveState"] == "active", agent
    times = {"agent start": int(agent["ExecMainStartTimestampMonotonic"]) / 1e6,
             "agent active": int(agent["ActiveEnterTimestampMonotonic"]) / 1e6}
    for unit in STANDINS:
        u = g.show(f"{unit}.service", "ActiveState", "InactiveExitTimestampMonotonic", "ActiveEnterTimestampMonotonic")
        assert u["ActiveState"] == "active", (unit, u)
        began, active = int(u["InactiveExitTimestampMonotonic"]) / 1e6, int(u["ActiveEnterTimestampMonotonic"]) / 1e6
        times[f"{unit} start"], times[f"{unit} active"] = began, active
        assert began >= times["agent active"], f"{unit} started at {began:.2f}s, before nvidia-agent was " \
                                               f"active at {times['agent active']:.2f}s"
        assert active >= times["agent active"], (unit, active, times)
        rec = seen(g, unit)
        # its record is from this boot and this start: /proc/uptime when ExecStart ran
        assert began - 1 <= float(rec["uptime"]) <= active + 1, (unit, rec, began, active)
        if driver_seen is not None:
            assert rec == {**rec, "module": "yes", "version": driver_seen, "nvidiactl": "yes", "nvidia0": "yes"}, \
                f"{unit} started without a working driver: {rec}"
    harness.log("  ordering (guest monotonic s): " + ", ".join(f"{k} {v:.2f}" for k, v in times.items()))
    return times


def assert_dropins(g: Guest) -> None:
    """One drop-in per consumer with literal values, and systemd applies it."""
    for unit in STANDINS:
        path = f"/etc/systemd/system/{unit}.service.d/50-nvidia-agent.conf"
        rc, text = g.run(f"cat {path}", quiet=True)
        assert rc == 0, f"{path} missing: {text}"
        directives = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
        assert directives == DROPIN_LINES, text
        assert "%" not in text and "$" not in text, f"specifiers or variables in {path}: {text}"
        u = g.show(f"{unit}.service", "After", "Wants", "DropInPaths")
        assert "nvidia-agent.service" in u["After"].split(), u
        assert "nvidia-agent.service" in u["Wants"].split(), u
        assert path in u["DropInPaths"].split(), u
        # the ordering is the agent's doing: the stand-in's own unit file has no dependency on it
        rc, own = g.run(f"grep -E '^(After|Wants|Requires|BindsTo|Requisite)=' /etc/systemd/system/{unit}.service",
                        quiet=True)
        assert rc == 1, f"{unit}.service orders itself: {own}"


def assert_systemd_contract(g: Guest, driver: str) -> None:
    """Issue 4 on a boot that reached ready: what an operator checks of the systemd side."""
    assert_ordered(g, driver_seen=driver)
    assert warnings(g) == "", f"journalctl -u nvidia-agent -b -p warning:\n{warnings(g)}"
    assert_dropins(g)
    rc, out = g.run("systemd-analyze verify /etc/systemd/system/nvidia-agent.service", quiet=True, timeout=60)
    harness.log(f"  systemd-analyze verify: rc={rc} {out.strip()!r}")
    assert rc == 0, out
    assert "nvidia-agent" not in out, out
    text = status_text(g)
    assert text.startswith("ready"), f"StatusText of nvidia-agent: {text!r}"


@contextlib.contextmanager
def driver_watch(g: Guest) -> Iterator[dict[str, Any]]:
    """Sample, every ~50 ms while the body runs, that nvidia is in /proc/modules and our overlay on
    /usr/lib64; yields a dict that gets `samples` and `gaps` (the failed samples) at the end."""
    result: dict[str, Any] = {}
    loop = ("n=0; while [ ! -e /run/vm-watch.stop ]; do n=$((n+1)); "
            "grep -q '^nvidia ' /proc/modules || echo \"gap $(cut -d' ' -f1 /proc/uptime) nvidia not loaded\"; "
            "grep -qE ' /usr/lib64 .* - overlay ' /proc/self/mountinfo "
            "|| echo \"gap $(cut -d' ' -f1 /proc/uptime) no overlay on /usr/lib64\"; "
            "sleep 0.05; done; echo samples $n")
    g.run("rm -f /run/vm-watch.stop /run/vm-watch.log", check=True, quiet=True)
    g.run(f"systemd-run -q --unit=vm-watch --collect -p StandardOutput=file:/run/vm-watch.log "
          f"/bin/sh -c {shlex.quote(loop)}", check=True, quiet=True)
    try:
        yield result
    finally:
        g.run("touch /run/vm-watch.stop; while systemctl is-active -q vm-watch; do sleep 0.1; done", quiet=True)
        _, out = g.run("cat /run/vm-watch.log", quiet=True)
        result["gaps"] = [ln for ln in out.splitlines() if ln.startswith("gap")]
        m = re.search(r"samples (\d+)", out)
        result["samples"] = int(m.group(1)) if m else 0


@contextlib.contextmanager
def holder(g: Guest, device: str = "/dev/nvidia0") -> Iterator[int]:
    """A process keeping `device` open, like a CUDA job."""
    g.run(f"systemd-run --unit=gpu-holder --collect /bin/sh -c 'exec sleep 100000 3<{device}'", check=True)
    pid = 0
    for _ in range(20):
        _, out = g.run("systemctl show -P MainPID gpu-holder", quiet=True)
        pid = int(out.strip() or 0)
        if pid and g.run(f"ls -l /proc/{pid}/fd | grep -q {device}", quiet=True)[0] == 0:
            break
        time.sleep(0.5)
    assert pid, "the holder did not start"
    try:
        yield pid
    finally:
        g.run("systemctl stop gpu-holder")


# --------------------------------------------------------------------------- scenarios

def test_first_boot(vm: Guest) -> None:
    """A fresh host with two GPUs: pull, install, mount, load, device nodes, ready."""
    st = settle(vm)
    harness.log(f"status: {json.dumps(st)}")
    assert len(st.get("gpus") or []) == harness.FAKE_GPUS, st.get("gpus")
    assert_serving(vm, st, DRIVER, vm.kernels.amd64)
    journal = vm.journal()
    assert pulled(journal), "first boot: no `pulling` event in the journal"
    assert st.get("digest", "").startswith("sha256:"), st


def test_first_boot_systemd_contract(vm: Guest) -> None:
    """Issue 4 on the first boot: kubelet and dcos-mesos-slave waited for a working driver; the
    agent's status line, journal, drop-ins and unit file are what an operator expects."""
    assert vm.boots == 1, "runs on the guest's first boot (right after test_first_boot, or alone)"
    settle(vm)
    assert_systemd_contract(vm, DRIVER)


def test_unchanged_reboot(vm: Guest) -> None:
    """Same kernel, same config: nothing pulled; modules loaded again; ready."""
    settle(vm)
    before = current_target(vm)
    vm.reboot()
    vm.wait_agent_active()
    st = settle(vm)
    journal = vm.journal()
    assert not pulled(journal), f"unchanged reboot pulled: {pulled(journal)}"
    assert current_target(vm) == before
    assert_serving(vm, st, DRIVER, vm.kernels.amd64)


def test_unchanged_reboot_systemd_contract(vm: Guest) -> None:
    """Issue 4 after an unchanged reboot (the drop-ins now exist from the start of the boot)."""
    if vm.boots == 1:  # alone: make the reboot test_unchanged_reboot made
        settle(vm)
        vm.reboot()
        vm.wait_agent_active()
    settle(vm)
    assert_systemd_contract(vm, DRIVER)


def test_busy_module_refuses_unload(vm: Guest) -> None:
    """A process holds /dev/nvidia0 while another driver version is requested."""
    settle(vm)
    try:
        with holder(vm) as pid:
            since = set_driver(vm, DRIVER2)
            st = settle(vm, want="degraded", since=since, timeout=300, stuck_s=60)
            text = error_text(st)
            harness.log(f"busy: last_error: {text!r}")
            assert re.search(r"\bnvidia\b", text), text
            assert re.search(rf"\b{pid}\b|\bsleep\b", text), f"holder (pid {pid}, sleep) not named: {text}"
            # nothing unloaded, the running driver still serves
            assert module_versions(vm).get("nvidia") == DRIVER
            assert vm.run(f"ls -l /proc/{pid}/fd | grep -q /dev/nvidia0", quiet=True)[0] == 0
            assert current_target(vm) == tree_for(DRIVER, vm.kernels.amd64)
            rc, smi = vm.run("/opt/nvidia/current/bin/nvidia-smi")
            assert rc == 0 and DRIVER in smi, smi
            journal = vm.run(f"journalctl -u nvidia-agent --since=@{since:.0f} --no-pager -o cat", quiet=True)[1]
            assert re.search(rf"\b{pid}\b|\bsleep\b", journal), "the journal does not name the holder"
    finally:
        since = set_driver(vm, None)
    assert_serving(vm, settle(vm, since=since), DRIVER, vm.kernels.amd64)


def test_real_driver_load_fails(vm: Guest) -> None:
    """NVIDIA's real 535 driver: installed and verified, but the kernel refuses it here."""
    real = harness.images_info().get("real")
    if not real:
        pytest.skip("no real driver image (NVIDIA_AGENT_REAL_DRIVER=1 tests/vm/run builds it, ~5 min once)")
    version, kernel = real["driver"], real["kernel"]
    if vm.kernel != kernel:
        vm.reboot(kernel=kernel)
    settle(vm)
    try:
        since = set_driver(vm, version)
        st = settle(vm, want="degraded", since=since, timeout=420, stuck_s=60)
        text = error_text(st)
        harness.log(f"real: last_error: {text!r}")
        # verified and installed next to the working tree
        real_tree = f"/opt/nvidia/{tree_for(version, kernel)}"
        assert vm.run(f"test -f {real_tree}/.nvidia-agent.json", quiet=True)[0] == 0, "real tree not installed"
        # the kernel's own reason, in the status and in the journal
        reason = None
        if vm.run("test -e /sys/module/nvidia", quiet=True)[0] != 0:
            _, out = vm.run(f"insmod {real_tree}/lib/modules/{kernel}/nvidia.ko")
            m = re.search(r":\s*([^:\n]+)\s*$", out.strip())
            reason = m.group(1).strip() if m else None
        harness.log(f"real: the kernel says: {reason!r}")
        errno_text = (r"No such device|Invalid argument|Unknown symbol|Exec format error|Operation not permitted|"
                      r"Key was rejected|Cannot allocate memory|Invalid module format|Input/output error|"
                      r"Device or resource busy|No such file or directory|Required key not available")
        assert (reason and reason in text) or (not reason and re.search(errno_text, text)), \
            f"status does not carry the kernel's reason {reason!r}: {text}"
        journal = vm.run(f"journalctl -u nvidia-agent --since=@{since:.0f} --no-pager -o cat", quiet=True)[1]
        assert (reason or "nvidia") in journal and re.search(errno_text, journal), journal[-3000:]
        # the previous working driver stays current, loaded and READY: status says it serves
        assert current_target(vm) == tree_for(DRIVER, kernel)
        assert st.get("serving") == f"/opt/nvidia/{tree_for(DRIVER, kernel)}", st
        assert module_versions(vm).get("nvidia") == DRIVER
        # the refusal is remembered: the next pass does not unload the working driver again
        first = st["last_reconcile_at"]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (st.get("last_reconcile_at") or 0) <= first:
            time.sleep(2)
            st = vm.status() or st
        again = error_text(st)
        harness.log(f"real: the next pass says: {again!r}")
        assert "was refused by kernel" in again and "systemctl reload nvidia-agent" in again, again
        journal = vm.run(f"journalctl -u nvidia-agent --since=@{since:.0f} --no-pager -o cat", quiet=True)[1]
        assert journal.count("refusal_remembered") == 1, journal[-3000:]
        assert len(re.findall(r"^(<\d>)?rolled_back\b", journal, re.M)) <= 1, "the working driver was unloaded again"
        assert module_versions(vm).get("nvidia") == DRIVER
        # an operator's reload tries once more
        vm.run("systemctl reload nvidia-agent", check=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and "refusal_forgotten" not in journal:
            time.sleep(2)
            journal = vm.run(f"journalctl -u nvidia-agent --since=@{since:.0f} --no-pager -o cat", quiet=True)[1]
        assert "refusal_forgotten" in journal, journal[-3000:]
    finally:
        since = set_driver(vm, None)
    assert_serving(vm, settle(vm, since=since), DRIVER, kernel)


def test_kernel_changed(vm: Guest) -> None:
    """Reboot into the -cloud-amd64 flavour: the agent installs the image built for it."""
    settle(vm)
    old, new = vm.kernel, vm.kernels.cloud if vm.kernel != vm.kernels.cloud else vm.kernels.amd64
    vm.reboot(kernel=new)
    assert vm.run("uname -r", quiet=True)[1].strip() == new
    vm.wait_agent_active()
    st = settle(vm)
    assert st.get("kernel_changed_from") == old, st
    journal = vm.journal()
    assert any(new in line for line in pulled(journal)), f"no pull for {new}: {pulled(journal)}"
    assert_serving(vm, st, DRIVER, new)
    # the previous kernel's tree stays installed for a boot back into it
    assert vm.run(f"test -d /opt/nvidia/{tree_for(DRIVER, old)}", quiet=True)[0] == 0


# --------------------------------------------------------------------------- issue 4: the systemd contract

def _unchanged_start_to_ready(vm: Guest) -> None:
    """Issue 12's P1 in a real boot's setting: systemd's own clocks from the process start to READY=1 (a
    Type=notify unit turns active when READY=1 arrives) for this unchanged start, beside `python3 -c pass`
    with the agent's interpreter, run by systemd the same way. Reported, not asserted (a benchmark, under TCG)."""
    times = vm.show("nvidia-agent", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    ready_ms = (int(times["ActiveEnterTimestampMonotonic"]) - int(times["ExecMainStartTimestampMonotonic"])) / 1e3
    assert ready_ms > 0, times
    _, shebang = vm.run("head -1 \"$(command -v nvidia-agent)\"", quiet=True)
    python = shebang.strip().removeprefix("#!").split()[0]
    rc, out = vm.run(f"systemd-run --wait --quiet --property=Type=exec {python} -c pass 2>&1; "
                     f"systemd-run --wait {python} -c pass 2>&1", quiet=True)
    runtime = re.search(r"Service runtime: ([0-9.]+)(ms|s)", out)
    assert rc == 0 and runtime, out
    pass_ms = float(runtime[1]) * (1 if runtime[2] == "ms" else 1000)
    harness.timed("unchanged start: ExecMainStart -> READY (s)", ready_ms / 1e3)
    harness.timed(f"the same unit's python3 -c pass ({python}) (s)", pass_ms / 1e3)


def test_restart_and_stop_keep_driver(vm: Guest) -> None:
    """`systemctl restart` and stop/start: the driver stays loaded and mounted; ready again, nothing pulled."""
    settle(vm)
    kernel, pid0 = vm.kernel, vm.show("nvidia-agent", "MainPID")["MainPID"]
    with driver_watch(vm) as watch:
        t = time.monotonic()
        rc, out = vm.run("systemctl restart nvidia-agent", timeout=180)  # Type=notify: returns at READY
        harness.timed("systemctl restart nvidia-agent (until READY)", time.monotonic() - t)
        assert rc == 0, out
        assert "nvidia" in proc_modules(vm), "nvidia not loaded right after the restart"
    harness.log(f"  restart: {watch['samples']} samples of /proc/modules and mountinfo, gaps: {watch['gaps']}")
    assert watch["samples"] >= 5, watch
    assert watch["gaps"] == [], f"the driver went away during the restart: {watch['gaps']}"
    a = vm.show("nvidia-agent", "MainPID", "ActiveState", "StatusText")
    assert a["ActiveState"] == "active" and a["MainPID"] != pid0, a
    assert_serving(vm, settle(vm), DRIVER, kernel)
    restarted_status = a["StatusText"]

    # stop: the agent goes, the driver stays for running workloads; the consumers are not stopped
    with driver_watch(vm) as watch:
        rc, out = vm.run("systemctl stop nvidia-agent", timeout=60)
        assert rc == 0, out
        assert vm.show("nvidia-agent", "ActiveState")["ActiveState"] == "inactive"
        assert module_versions(vm).get("nvidia") == DRIVER
        assert "/dev/nvidiactl" in device_nodes(vm) and "/dev/nvidia0" in device_nodes(vm)
        rc, smi = vm.run("/opt/nvidia/current/bin/nvidia-smi", quiet=True)
        assert rc == 0 and DRIVER in smi, smi
        for unit in STANDINS:
            assert vm.show(f"{unit}.service", "ActiveState")["ActiveState"] == "active", unit
        assert vm.run("nvidia-agent status", quiet=True)[0] == 1  # nobody answers: "unreachable"
        t = time.monotonic()
        rc, out = vm.run("systemctl start nvidia-agent", timeout=180)
        harness.timed("systemctl start nvidia-agent (until READY)", time.monotonic() - t)
        assert rc == 0, out
    assert watch["gaps"] == [], f"the driver went away while the agent was stopped: {watch['gaps']}"
    _unchanged_start_to_ready(vm)
    inv = vm.show("nvidia-agent", "InvocationID")["InvocationID"]
    _, journal = vm.run(f"journalctl _SYSTEMD_INVOCATION_ID={inv} --no-pager -o cat", quiet=True)
    assert re.search(r"^(<\d>)?ready\b", journal, re.M), f"no ready line from this start:\n{journal}"
    assert not pulled(journal), f"a start on an installed host pulled: {pulled(journal)}"
    assert_serving(vm, settle(vm), DRIVER, kernel)
    assert restarted_status.startswith("ready"), f"StatusText after the restart: {restarted_status!r}"
    assert status_text(vm).startswith("ready"), f"StatusText after the start: {status_text(vm)!r}"


def test_reload_reconciles(vm: Guest) -> None:
    """`systemctl reload nvidia-agent` (README: SIGHUP, reconcile now): same process, a fresh reconcile."""
    st0 = settle(vm)
    pid = vm.show("nvidia-agent", "MainPID")["MainPID"]
    rc, out = vm.run("systemctl reload nvidia-agent", timeout=60)
    _, tail = vm.run("journalctl -u nvidia-agent -b --no-pager -o cat | tail -5", quiet=True)
    assert rc == 0, f"systemctl reload nvidia-agent: {out}\n{tail}"
    deadline = time.monotonic() + 60
    st: dict[str, Any] | None = st0
    while time.monotonic() < deadline:
        st = vm.status()
        if st and (st.get("last_reconcile_at") or 0) > (st0.get("last_reconcile_at") or 0):
            break
        time.sleep(1)
    assert st and (st.get("last_reconcile_at") or 0) > (st0.get("last_reconcile_at") or 0), "no reconcile after reload"
    assert st["phase"] == "ready", st
    assert vm.show("nvidia-agent", "MainPID")["MainPID"] == pid


WEDGE_DROPIN = "/etc/systemd/system/nvidia-agent.service.d/90-vm-wedge.conf"


def test_watchdog_kills_wedged_agent(vm: Guest) -> None:
    """The main loop stops feeding the watchdog (fault injection): systemd kills and restarts the agent."""
    settle(vm)
    restarts0 = int(vm.show("nvidia-agent", "NRestarts")["NRestarts"])
    try:
        vm.put(WEDGE_DROPIN, "[Service]\nEnvironment=NVIDIA_AGENT_TEST_WEDGE_S=600\nWatchdogSec=10s\n")
        vm.run("systemctl daemon-reload", check=True)
        since = vm.guest_time()
        vm.run("systemctl restart --no-block nvidia-agent", check=True)
        t = time.monotonic()
        seen_result = ""
        journal = ""
        while time.monotonic() - t < 120:
            a = vm.show("nvidia-agent", "Result", "NRestarts", "ActiveState", "SubState")
            if a["Result"] == "watchdog":
                seen_result = "watchdog"
            journal = vm.run(f"journalctl -u nvidia-agent --since=@{since:.0f} --no-pager -o cat", quiet=True)[1]
            if seen_result and "Watchdog timeout" in journal and int(a["NRestarts"]) > restarts0:
                break
            time.sleep(1)
        harness.timed("wedged agent: watchdog kill and restart seen", time.monotonic() - t)
        harness.log(f"  watchdog: {a}")
        assert "test_wedge" in journal, f"the agent never wedged:\n{journal}"
        assert "Watchdog timeout" in journal, f"no watchdog timeout in the journal:\n{journal}"
        assert seen_result == "watchdog", a
        assert int(a["NRestarts"]) > restarts0, f"not restarted (Restart=on-failure): {a}"
        # KillMode=process: the killed agent took nothing with it
        assert module_versions(vm).get("nvidia") == DRIVER
    finally:
        vm.run(f"rm -f {WEDGE_DROPIN}; systemctl daemon-reload; systemctl kill -s KILL nvidia-agent; "
               "systemctl reset-failed nvidia-agent; true")
        since = vm.guest_time()
        vm.run("systemctl restart --no-block nvidia-agent", check=True)
    assert_serving(vm, settle(vm, since=since), DRIVER, vm.kernel)
    a = vm.show("nvidia-agent", "WatchdogUSec", "StatusText")
    assert a["WatchdogUSec"] == "2min" and a["StatusText"].startswith("ready"), a


def test_new_driver_without_an_image_keeps_the_old_one_serving(vm: Guest) -> None:
    """driver.version moves to a release whose image is not published for this kernel: after a reboot
    the installed driver is loaded and mounted at once, kubelet starts with it (READY with a degraded
    status), and the new driver installs without a restart once its image appears."""
    settle(vm)
    kernel = vm.kernels.amd64
    late = f"kept-{DRIVER2}-debian-12-{kernel}"  # a tag of its own: the no-image scenario publishes late-
    try:
        if vm.kernel != kernel or not current_target(vm).startswith(f"{DRIVER}/"):
            set_driver(vm, None)
            settle(vm)
        vm.run(f"rm -rf /opt/nvidia/{DRIVER2} /var/log/*.seen", check=True)
        vm.put(OVERRIDE, f'[driver]\nversion = "{DRIVER2}"\n\n[image]\ntag_template = "kept-{{driver}}-{{os}}"\n\n'
                         "[daemon]\nready_timeout_s = 120\nretry_initial_s = 2.0\nretry_max_s = 4\n")
        vm.reboot(kernel="amd64")
        vm.wait_agent_active(timeout=180)
        times = assert_ordered(vm, driver_seen=DRIVER)
        waited = times["agent active"] - times["agent start"]
        harness.timed("no new image: agent READY with the old driver after its start (guest clock)", waited)
        assert waited < 60, f"READY {waited:.1f}s after start: the working driver should not wait for the new one"
        # a retry pass (every 2-4 s here) shows its phase in StatusText; between passes: degraded, serving
        queries, text = 0, ""
        while queries < 10 and not text.startswith("degraded"):
            queries, text = queries + 1, status_text(vm)
            time.sleep(0 if text.startswith("degraded") else 0.5)
        harness.log(f"  StatusText (query {queries}): {text!r}")
        assert text.startswith(f"degraded: serving /opt/nvidia/{tree_for(DRIVER, kernel)}"), text
        rc, out = vm.run("nvidia-agent status", quiet=True)
        harness.log(f"  nvidia-agent status (rc={rc}):\n{out}")
        assert rc == 2 and re.search(rf"^serving:\s+/opt/nvidia/{re.escape(tree_for(DRIVER, kernel))}", out, re.M), out
        assert late in out, out
        assert module_versions(vm).get("nvidia") == DRIVER
        published = vm.guest_time()
        vm.tag_image("nvidia/driver", f"{DRIVER2}-debian-12-{kernel}", late)
        st = settle(vm, timeout=120, since=published)
        assert_serving(vm, st, DRIVER2, kernel)
    finally:
        since = set_driver(vm, None)
    assert_serving(vm, settle(vm, since=since), DRIVER, vm.kernel)


def test_no_image_yet_degraded_then_ready(vm: Guest) -> None:
    """First boot with no image for this host in the registry and no driver installed: kubelet waits
    daemon.ready_timeout_s, no more; once the image is published the agent becomes ready on its own,
    without a restart."""
    settle(vm)
    kernel = vm.kernels.amd64
    timeout_s, retry_max_s = 20, 4
    late = f"late-{DRIVER2}-debian-12-{kernel}"
    try:
        # nothing installed that could serve meanwhile, and no tag matches the template yet
        vm.run("rm -rf /opt/nvidia/* /var/log/*.seen", check=True)
        vm.put(OVERRIDE, f'[driver]\nversion = "{DRIVER2}"\n\n[image]\ntag_template = "late-{{driver}}-{{os}}"\n\n'
                         f"[daemon]\nready_timeout_s = {timeout_s}\nretry_initial_s = 2.0\n"
                         f"retry_max_s = {retry_max_s}\n")
        vm.reboot(kernel="amd64")
        vm.wait_agent_active(timeout=180)
        times = assert_ordered(vm, driver_seen=None)
        waited = times["agent active"] - times["agent start"]
        harness.timed("no image: agent READY (degraded) after its start (guest clock)", waited)
        # the deadline runs from the process's start in /proc (clock ticks), systemd's from its fork
        assert timeout_s - 1 <= waited <= timeout_s + 45, f"READY {waited:.1f}s after start, timeout {timeout_s}s"
        for unit in STANDINS:
            assert times[f"{unit} start"] >= times["agent start"] + timeout_s - 1, (unit, times)
        for unit in STANDINS:
            assert seen(vm, unit)["module"] == "no", seen(vm, unit)
        # what an operator sees. Between retries (every retry_max_s here) the phase is degraded;
        # during one, StatusText and the status show the phase in progress (detecting, resolving)
        queries, text = 0, ""
        while queries < 10 and not text.startswith("degraded"):
            queries, text = queries + 1, status_text(vm)
            time.sleep(0 if text.startswith("degraded") else 0.5)
        harness.log(f"  StatusText (query {queries}): {text!r}")
        assert text.startswith("degraded"), f"StatusText: {text!r}"
        queries, out, rc = 0, "", -1
        while queries < 10 and not re.search(r"^phase:\s+degraded", out, re.M):
            queries += 1
            rc, out = vm.run("nvidia-agent status", quiet=True)
            time.sleep(0 if re.search(r"^phase:\s+degraded", out, re.M) else 0.5)
        harness.log(f"  nvidia-agent status (rc={rc}, query {queries}):\n{out}")
        assert rc == 2 and re.search(r"^phase:\s+degraded", out, re.M) and late in out, out
        warn = warnings(vm)
        harness.log(f"  journalctl -u nvidia-agent -b -p warning:\n{warn}")
        assert re.search(r"^(<\d>)?ready_degraded\b", warn, re.M), warn
        assert any(late in ln and "ready_degraded" not in ln for ln in warn.splitlines()), \
            f"no warning names the missing image {late}:\n{warn}"
        a0 = vm.show("nvidia-agent", "MainPID", "NRestarts")
        # the image is published late; the agent's retry finds it
        published = vm.guest_time()
        digest = vm.tag_image("nvidia/driver", f"{DRIVER2}-debian-12-{kernel}", late)
        harness.log(f"  published {late} ({digest})")
        t = time.monotonic()
        st = settle(vm, timeout=120, since=published)
        harness.timed("no image: ready after the image was published (host wait)", time.monotonic() - t)
        took = st["phase_since"] - published
        harness.timed("no image: ready after the image was published (guest clock)", took)
        assert took <= retry_max_s + 20, f"ready {took:.0f}s after the image appeared; retry_max_s={retry_max_s}"
        assert vm.show("nvidia-agent", "MainPID", "NRestarts") == a0, "the agent was restarted"
        assert status_text(vm).startswith("ready"), status_text(vm)
        assert_serving(vm, st, DRIVER2, kernel)
        _, journal = vm.run(f"journalctl -u nvidia-agent --since=@{int(published)} --no-pager -o cat", quiet=True)
        assert any(late in ln or DRIVER2 in ln for ln in pulled(journal)), journal[-2000:]
    finally:
        since = set_driver(vm, None)
    assert_serving(vm, settle(vm, since=since), DRIVER, vm.kernel)


BLACKHOLE = "/etc/systemd/system/blackhole-registry"  # .socket and .service
SHORT_WATCHDOG = "/etc/systemd/system/nvidia-agent.service.d/90-vm-short-watchdog.conf"


def test_blackholed_registry_at_boot_keeps_the_contract(vm: Guest) -> None:
    """A registry that accepts connections and never answers, at boot, with WatchdogSec=6s: READY
    (degraded) comes at ready_timeout_s while the agent still retries, the watchdog never fires, and
    `systemctl stop` mid-pull leaves the unit inactive, not failed, within a few seconds."""
    settle(vm)
    timeout_s = 20
    try:
        # systemd listens from sockets.target on; the kernel completes every TCP handshake into the
        # backlog and nothing ever reads it: connections succeed, answers never come
        vm.put(f"{BLACKHOLE}.socket", "[Unit]\nDescription=A registry that never answers (VM test)\n"
                                      "[Socket]\nListenStream=127.0.0.1:5001\nBacklog=512\n"
                                      "[Install]\nWantedBy=sockets.target\n")
        vm.put(f"{BLACKHOLE}.service", "[Service]\nExecStart=/bin/sleep infinity\n")
        vm.put(SHORT_WATCHDOG, "[Service]\nWatchdogSec=6s\n")
        vm.put(OVERRIDE, '[image]\nregistry = "127.0.0.1:5001"\nplain_http = ["127.0.0.1:5001"]\n'
                         "timeout_s = 5.0\nattempts = 3\n\n"
                         f"[daemon]\nready_timeout_s = {timeout_s}\nretry_initial_s = 2.0\nretry_max_s = 4\n")
        vm.run("systemctl daemon-reload && systemctl enable -q blackhole-registry.socket && rm -rf /opt/nvidia/*",
               check=True)
        vm.reboot(kernel="amd64")
        vm.wait_agent_active(timeout=180)
        a = vm.show("nvidia-agent", "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic",
                    "MainPID", "NRestarts", "WatchdogUSec")
        waited = (int(a["ActiveEnterTimestampMonotonic"]) - int(a["ExecMainStartTimestampMonotonic"])) / 1e6
        harness.timed("blackholed registry: degraded READY after the agent's start (guest clock)", waited)
        assert a["WatchdogUSec"] == "6s", a
        assert timeout_s - 1 <= waited <= timeout_s + 10, f"READY {waited:.1f}s after start, want ~{timeout_s}s"
        time.sleep(36)  # six watchdog periods, with the pipeline stuck in reads that never return
        b = vm.show("nvidia-agent", "MainPID", "NRestarts", "ActiveState", "SubState", "StatusText")
        harness.log(f"  after 36 s more: {b}")
        assert (b["MainPID"], b["NRestarts"], b["ActiveState"]) == (a["MainPID"], a["NRestarts"], "active"), (a, b)
        journal = vm.journal()
        assert "Watchdog timeout" not in vm.run("journalctl -b -u nvidia-agent --no-pager", quiet=True)[1]
        assert journal.count("registry_retry") >= 3, journal[-3000:]  # still trying, READY or not
        rc, out = vm.run("nvidia-agent status", quiet=True)
        harness.log(f"  nvidia-agent status (rc={rc}):\n{out}")
        assert rc == 2 and "127.0.0.1:5001" in out, out
        t = time.monotonic()
        vm.run("systemctl stop nvidia-agent", check=True, timeout=60)
        stopped_s = time.monotonic() - t
        harness.timed("blackholed registry: systemctl stop mid-pull (host wait)", stopped_s)
        c = vm.show("nvidia-agent", "ActiveState", "Result", "ExecMainStatus")
        assert (c["ActiveState"], c["Result"], c["ExecMainStatus"]) == ("inactive", "success", "0"), c
        assert stopped_s < 12, f"stop took {stopped_s:.1f}s"
    finally:
        vm.run(f"systemctl disable -q --now blackhole-registry.socket blackhole-registry.service; "
               f"rm -f {BLACKHOLE}.socket {BLACKHOLE}.service {SHORT_WATCHDOG} {OVERRIDE}; systemctl daemon-reload; "
               "systemctl reset-failed nvidia-agent; true")
        since = vm.guest_time()
        vm.run("systemctl restart --no-block nvidia-agent", check=True)
    assert_serving(vm, settle(vm, since=since), DRIVER, vm.kernel)



EXTENSION = "/var/lib/extensions/vmtest"


def test_sysext_merge_over_the_overlay_is_undone(vm: Guest) -> None:
    """systemd-sysext merging an extension mounts an overlay on /usr, on top of the agent's overlay on
    /usr/lib64, which stays listed but hidden: the agent notices the mount change, mounts its overlay on
    top again within seconds (check_interval_s is 300), and the extension's files stay visible too.
    A refresh (unmerge, merge) likewise. Last in the file: what it leaves mounted is undone by unmerge."""
    settle(vm)
    lib = f"/usr/lib64/libnvidia-ml.so.{DRIVER}"
    shown = f"test -e {lib} && test -x /usr/bin/vmtest-tool"
    try:
        vm.run(f"mkdir -p {EXTENSION}/usr/lib/extension-release.d {EXTENSION}/usr/bin && "
               f"echo ID=_any > {EXTENSION}/usr/lib/extension-release.d/extension-release.vmtest && "
               f"printf '#!/bin/sh\\necho vmtest\\n' > {EXTENSION}/usr/bin/vmtest-tool && "
               f"chmod 755 {EXTENSION}/usr/bin/vmtest-tool", check=True)
        for verb in ("merge", "refresh"):
            since = vm.guest_time()
            vm.run(f"systemd-sysext {verb}", check=True)
            t0 = time.monotonic()
            hidden = vm.run(f"test -e {lib}", quiet=True)[0] != 0
            while vm.run(shown, quiet=True)[0] != 0 and time.monotonic() - t0 < 60:
                time.sleep(0.5)
            took = time.monotonic() - t0
            harness.timed(f"systemd-sysext {verb}: the driver's libraries shown again (host wait)", took)
            harness.log(f"  right after {verb} the libraries were {'hidden' if hidden else 'already back'}")
            assert vm.run(shown, quiet=True)[0] == 0, vm.run("findmnt -R /usr", quiet=True)[1]
            assert took < 20, f"the overlay came back {took:.1f}s after systemd-sysext {verb}"
            # the pass that mounted it goes on (modules, nodes); a mount change in the middle of it
            # would be caught by its own check, a retry later: let it finish before the next verb
            assert settle(vm, since=since)["phase"] == "ready"
        _, mountinfo = vm.run("cat /proc/self/mountinfo", quiet=True)
        harness.log(f"  mountinfo after merge and refresh:\n{mountinfo}")
        journal = vm.journal()
        assert journal.count("overlay_hidden") >= 2, journal[-3000:]
        st = vm.status()
        assert st is not None and st["phase"] == "ready", st
    finally:
        vm.run(f"systemd-sysext unmerge; rm -rf {EXTENSION}; true")
    st = settle(vm)
    assert vm.run(f"test -e {lib}", quiet=True)[0] == 0
    assert st["phase"] == "ready"
