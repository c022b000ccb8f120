"""Crash safety: SIGKILL the agent at every install checkpoint, then prove the next run converges.

At each fail point of agent/failpoints.py the agent dies as if the power failed (SIGKILL, no
clean-up code runs). Right after the kill `current` must be absent or name a complete tree (its
marker present, every file as its manifest says); the next run must reach READY, point `current`
at the new tree, and leave no debris: no staging or trash directory, no half-made `current`
link, no temporary state file, no blob or partial download in the content store.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from agent.failpoints import ENV, POINTS
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, K2, Host, push_driver, tree_path

pytestmark = pytest.mark.integration

# Points a first install passes (pruning needs an older tree); enough data for several download chunks.
FIRST_INSTALL = [p for p in POINTS if p != "prune.trashed"]
# Points where an older tree exists and matters: the rename, the `current` swap, the state, the prune.
UPGRADE = ["install.renamed", "current.link", "current.switched", "state.written", "prune.trashed"]
BIG_LIB_BYTES = 1_500_000


def tree_is_complete(tree: Path) -> bool:
    """The tree has its marker and every file its manifest names, with that digest."""
    if not (tree / ".nvidia-agent.json").is_file():
        return False
    files = json.loads((tree / "manifest.json").read_text())["files"]
    return all(
        (tree / rel).is_file() and "sha256:" + hashlib.sha256((tree / rel).read_bytes()).hexdigest() == digest
        for rel, digest in files.items())


def assert_current_is_sound(host: Host, allowed: set[str | None]) -> None:
    current = host.current()
    assert current in allowed, current
    if current is not None:
        assert tree_is_complete(host.root / "opt/nvidia" / current), f"current -> {current} is incomplete"


def assert_clean(host: Host) -> None:
    """No debris anywhere the agent writes."""
    assert host.debris() == []
    assert not list((host.root / "opt/nvidia").glob(".current.tmp-*"))
    assert not list((host.root / "var/lib/nvidia-agent").glob(".*.tmp-*"))
    store = host.root / "var/cache/nvidia-agent/blobs"
    assert [p.name for p in store.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("point", FIRST_INSTALL)
def test_first_install_killed_at_each_checkpoint_converges(tmp_path: Path, registry: RegistryServer, host: Host,
                                                           point: str) -> None:
    """Killed anywhere in a first install, the agent leaves `current` absent or complete; the next run
    is READY with the tree in place and nothing left over (a cut download is resumed, not restarted)."""
    push_driver(tmp_path, registry.host, K1, big_lib_bytes=BIG_LIB_BYTES)
    killed = host.once(env={ENV: point})
    assert killed.returncode == -9, f"fail point {point} was not reached:\n{killed.stdout}{killed.stderr}"
    want = f"{DRIVER}/ubuntu-22.04-{K1}"
    assert_current_is_sound(host, {None, want})
    again = host.once()
    assert again.returncode == 0, again.stdout + again.stderr
    assert host.current() == want
    assert tree_is_complete(host.root / tree_path(K1).lstrip("/"))
    assert len(host.our_mounts()) == 1
    assert_clean(host)
    if point == "fetch.chunk":
        assert "blob_resumed" in again.stdout, "the partial download was thrown away instead of resumed"


K0 = "6.1.0-27-amd64"


@pytest.mark.parametrize("point", UPGRADE)
def test_kernel_update_killed_at_each_checkpoint_keeps_a_complete_current(
        tmp_path: Path, registry: RegistryServer, host: Host, point: str) -> None:
    """Killed while installing the new kernel's tree and pruning an old one, `current` names the old
    complete tree or the new complete tree, never anything else; the next run converges on the new one.
    Three kernels: the oldest tree is the one keep_trees = 1 prunes (the previous boot's always stays)."""
    for kernel in (K0, K1):
        push_driver(tmp_path, registry.host, kernel)
        host.set_kernel(kernel)
        assert host.once().returncode == 0
    push_driver(tmp_path, registry.host, K2, big_lib_bytes=BIG_LIB_BYTES)
    host.set_kernel(K2)
    host.configure(registry.host, "[install]\nkeep_trees = 1\n")
    killed = host.once(env={ENV: point})
    assert killed.returncode == -9, f"fail point {point} was not reached:\n{killed.stdout}{killed.stderr}"
    old, new = f"{DRIVER}/ubuntu-22.04-{K1}", f"{DRIVER}/ubuntu-22.04-{K2}"
    assert_current_is_sound(host, {old, new})
    again = host.once()
    assert again.returncode == 0, again.stdout + again.stderr
    assert host.current() == new
    assert tree_is_complete(host.root / tree_path(K2).lstrip("/"))
    assert not (host.root / tree_path(K0).lstrip("/")).exists(), "keep_trees = 1 prunes the oldest tree"
    assert tree_is_complete(host.root / tree_path(K1).lstrip("/")), "the previous boot's tree stays"
    assert len(host.our_mounts()) == 1
    assert_clean(host)


def test_every_fail_point_is_in_the_matrix() -> None:
    """A checkpoint added to the agent is killed at by these tests too."""
    assert set(FIRST_INSTALL) | set(UPGRADE) == set(POINTS)
