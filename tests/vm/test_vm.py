"""VM tier: what an operator sees on a real Debian host (systemd PID 1, real kernel) under QEMU.

One guest, one disk, the scenarios in order (each also works alone: it brings the guest to the
state it starts from):

1. first boot: pull, install, overlay on /usr/lib64, modules in dependency order, device nodes,
   ready, nvidia-smi through /usr/lib64;
2. unchanged reboot: nothing pulled, modules loaded again, ready;
3. busy module + different driver requested: the agent refuses to unload and names the holder;
4. the real 535 driver (when built): installs and verifies, the load fails with the kernel's
   own reason, the previous driver stays current;
5. reboot into the other kernel flavour: the agent installs the image built for it.

Run: tests/vm/run  (or: python -m tests.vm.harness run first_boot kernel_changed).
What each scenario leaves behind (status, journal, /proc/modules, /dev/nvidia*, mountinfo, ...)
is collected under $NVIDIA_AGENT_VM_CACHE/runs/<time>/<scenario>/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.vm import harness
from tests.vm.harness import DRIVER, DRIVER2, Guest

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.timeout(1500)]

LOADABLE_MODULES = ("nvidia", "nvidia_uvm", "nvidia_modeset", "nvidia_drm")
NVIDIA_MAJOR = 195
OVERRIDE = "/etc/nvidia-agent/config.d/60-scenario.toml"


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def artifacts() -> Path:
    base = Path(os.environ.get("NVIDIA_AGENT_VM_ARTIFACTS", harness.CACHE / "runs"))
    d = base / time.strftime("%Y%m%d-%H%M%S")
    d.mkdir(parents=True, exist_ok=True)
    os.environ["NVIDIA_AGENT_VM_ARTIFACTS_USED"] = str(d)
    return d


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
    t = time.monotonic()
    yield guest
    harness.timed(f"scenario {request.node.name}", time.monotonic() - t)
    guest.collect(artifacts / request.node.name)


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
        # the previous working driver stays current
        assert current_target(vm) == tree_for(DRIVER, kernel)
        assert st.get("current") in (None, f"/opt/nvidia/{tree_for(DRIVER, kernel)}", tree_for(DRIVER, kernel)), st
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
