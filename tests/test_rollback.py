"""`nvidia-agent rollback`: the previous tree for the running kernel, pinned until undone.

Pure parts (which tree, while the pin holds, a pin from a hostile state file) by table; the
command end to end with the daemon on a sandboxed host: a new driver version is installed and
runs, the rollback brings the previous one back (and keeps it through later passes), --undo
returns to the configured one, and with nothing to go back to the command says so.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import DriverSettings, ImageSettings, Settings
from agent.hostfacts import OSInfo
from agent.plan import Installed, pinned_target, rollback_candidate, target_for_boot
from agent.state import Pin, Refusal, State, TreeMarker, load_state
from support.images import build_image, make_driver_tree
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, K2, REPO, REPO_ROOT, Host, RunningAgent, push_driver, tree_path

DRIVER2 = "535.261.04"
UBUNTU = OSInfo("ubuntu", "22.04", "Ubuntu 22.04", False)


def marker(driver: str, kernel: str, at: float) -> TreeMarker:
    return TreeMarker(driver, f"ubuntu-22.04-{kernel}", kernel,
                      f"r.example/nvidia/driver:{driver}-ubuntu-22.04-{kernel}", "sha256:" + "a" * 64, at)


def tree(driver: str, kernel: str) -> str:
    return f"/opt/nvidia/{driver}/ubuntu-22.04-{kernel}"


TREES = ((tree(DRIVER, K1), marker(DRIVER, K1, 100.0)), (tree(DRIVER2, K1), marker(DRIVER2, K1, 200.0)),
         (tree(DRIVER, K2), marker(DRIVER, K2, 300.0)))


DRIVER3 = "535.261.05"
SETTINGS = Settings(driver=DriverSettings(DRIVER2), image=ImageSettings(registry="r.example"))


def configured_for(kernel: str, driver: str = DRIVER2) -> Any:
    return target_for_boot(Settings(driver=DriverSettings(driver), image=ImageSettings(registry="r.example")),
                           UBUNTU, kernel, "amd64")


@pytest.mark.parametrize(("current", "state", "expected"), [
    (tree(DRIVER2, K1), State(), tree(DRIVER, K1)),  # the one before the new driver
    (None, State(), tree(DRIVER, K1)),
    # serving the old tree while the configured one fails: the configured one is never "back"
    (tree(DRIVER, K1), State(), tree(DRIVER, K1)),
    # rolled back already: further back, not forward to the configured one
    (tree(DRIVER, K1), State(pinned=Pin(tree(DRIVER, K1), tree(DRIVER2, K1), K1, 1.0)), None),
    (tree(DRIVER2, K1), State(refused=Refusal(tree(DRIVER, K1), "sha256:" + "a" * 64, K1, "[]", "no", 1.0)), None),
])
def test_the_candidate_is_an_earlier_tree_for_this_os_and_kernel(current: str | None, state: State,
                                                                 expected: str | None) -> None:
    found = rollback_candidate(Installed(None, current, None, TREES), configured_for(K1), state)
    assert (found[0] if found else None) == expected


def test_the_next_boots_staged_tree_is_no_candidate() -> None:
    """An OS update that keeps the kernel staged its tree, newest of all: not a rollback target."""
    staged_tree = f"/opt/nvidia/{DRIVER2}/ubuntu-22.04.1-{K1}"
    staged = (staged_tree, TreeMarker(DRIVER2, f"ubuntu-22.04.1-{K1}", K1, "r.example/nvidia/driver:x",
                                      "sha256:" + "b" * 64, 900.0))
    installed = Installed(None, tree(DRIVER2, K1), None, (*TREES, staged))
    found = rollback_candidate(installed, configured_for(K1), State(staged=staged_tree))
    assert found is not None and found[0] == tree(DRIVER, K1)
    older = (tree(DRIVER3, K1), marker(DRIVER3, K1, 50.0))
    pinned = State(pinned=Pin(tree(DRIVER, K1), tree(DRIVER2, K1), K1, 1.0))
    further = rollback_candidate(Installed(None, tree(DRIVER, K1), None, (*TREES, older)), configured_for(K1), pinned)
    assert further is not None and further[0] == tree(DRIVER3, K1), "a second rollback goes further back"


def test_a_pin_holds_only_for_its_kernel_and_configured_target() -> None:
    configured = target_for_boot(SETTINGS, UBUNTU, K1, "amd64")
    assert configured.tree == tree(DRIVER2, K1)
    pin = Pin(tree(DRIVER, K1), configured.tree, K1, 1.0)
    installed = Installed(None, tree(DRIVER, K1), None, TREES)
    pinned = pinned_target(configured, K1, State(pinned=pin), installed)
    assert pinned is not None and (pinned.tree, pinned.driver, pinned.kernel) == (tree(DRIVER, K1), DRIVER, K1)
    assert str(pinned.reference) == f"r.example/nvidia/driver:{DRIVER}-ubuntu-22.04-{K1}"
    assert pinned_target(configured, K2, State(pinned=pin), installed) is None, "another kernel ends it"
    other = target_for_boot(Settings(image=ImageSettings(registry="r.example")), UBUNTU, K1, "amd64")
    assert pinned_target(other, K1, State(pinned=pin), installed) is None, "another configured driver ends it"
    gone = Installed(None, None, None, TREES[1:])
    assert pinned_target(configured, K1, State(pinned=pin), gone) is None, "a pruned tree cannot be pinned"
    elsewhere = Installed(None, None, None, ((tree(DRIVER, K1), TreeMarker(
        DRIVER, f"ubuntu-22.04-{K1}", K1, f"other.example/nvidia/driver:{DRIVER}-ubuntu-22.04-{K1}",
        "sha256:" + "a" * 64, 1.0)),))
    assert pinned_target(configured, K1, State(pinned=pin), elsewhere) is None, \
        "a tree from a registry no longer configured is not brought back"


@pytest.mark.parametrize("pinned", [
    {"tree": "opt/nvidia/x", "instead_of": "/opt/nvidia/y", "kernel": K1, "at": 1},
    {"tree": "/opt/nvidia/../../etc", "instead_of": "/opt/nvidia/y", "kernel": K1, "at": 1},
    {"tree": "/opt/nvidia/x", "instead_of": "/opt/nvidia/y", "kernel": "../k", "at": 1},
    {"tree": "/opt/nvidia/x", "instead_of": "/opt/nvidia/y", "kernel": K1, "at": "now"},
    {"tree": ["/opt"], "instead_of": "/opt/nvidia/y", "kernel": K1, "at": 1},
    "pinned",
])
def test_a_pin_from_a_bad_state_file_is_not_trusted(tmp_path: Path, pinned: Any) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"last_kernel": K1, "pinned": pinned}))
    state = load_state(path)
    assert state.pinned is None and state.last_kernel == K1


# --- the command, end to end

def cli(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "--root", str(host.root), *args], capture_output=True,
                          text=True, timeout=120, check=False, cwd=REPO_ROOT)


def wait_current(agent: RunningAgent, want: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = agent.status_json()
        if status.get("current") == want and status.get("phase") == "ready":
            return status
        time.sleep(0.3)
    raise AssertionError(f"current is not {want}: {json.dumps(status)[:1200]}")


@pytest.mark.integration
def test_rollback_to_the_previous_driver_and_undo(tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    push_driver(tmp_path, registry.host, K1)
    newer = make_driver_tree(tmp_path / "tree-newer", driver=DRIVER2, kernel=K1)
    build_image(newer, f"{registry.host}/{REPO}:{DRIVER2}-ubuntu-22.04-{K1}", driver=DRIVER2, os_id="ubuntu",
                os_version="22.04", kernel=K1)
    with RunningAgent(host) as agent:
        wait_current(agent, tree_path(K1))
        nothing = cli(host, "rollback")
        assert nothing.returncode == 1 and "nothing to roll back to" in nothing.stderr, nothing.stderr
        assert f"trees for it: {tree_path(K1)}" in nothing.stderr, nothing.stderr
        agent.stop()
    host.configure(registry.host, extra=f'[driver]\nversion = "{DRIVER2}"\n')
    with RunningAgent(host) as agent:
        wait_current(agent, tree(DRIVER2, K1))
        back = cli(host, "rollback", "--wait", "60")
        assert back.returncode == 0, back.stdout + back.stderr
        assert f"activating {tree_path(K1)}" in back.stdout and f"instead of {tree(DRIVER2, K1)}" in back.stdout
        status = wait_current(agent, tree_path(K1))
        assert status["pinned"] == {"tree": tree_path(K1), "instead_of": tree(DRIVER2, K1)}
        assert f"rolled back: to {tree_path(K1)}" in agent.status().stdout
        assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
        code, log = agent.stop()
    assert code == 0 and "rollback_pinned" in log, log
    state = load_state(host.root / "var/lib/nvidia-agent/state.json")
    assert state.pinned is not None and state.pinned.tree == tree_path(K1)

    with RunningAgent(host) as agent:  # a restart keeps the rollback
        status = wait_current(agent, tree_path(K1))
        assert status["pinned"], status
        undo = cli(host, "rollback", "--undo", "--wait", "60")
        assert undo.returncode == 0, undo.stdout + undo.stderr
        wait_current(agent, tree(DRIVER2, K1))
        again = cli(host, "rollback", "--undo")
        assert again.returncode == 1 and "nothing is rolled back" in again.stderr
        code, log = agent.stop()
    assert code == 0 and "rollback_undone" in log, log
    assert load_state(host.root / "var/lib/nvidia-agent/state.json").pinned is None
