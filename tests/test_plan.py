"""The planner: a table of host situations and the actions each one needs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.config import ModuleSettings, MountSettings, Settings
from agent.hostfacts import GPU, HostFacts, Mount, OSInfo
from agent.plan import (
    CreateDeviceNodes,
    Installed,
    InstallImage,
    Ldconfig,
    LoadModules,
    MountOverlay,
    StartPersistenced,
    SwitchCurrent,
    Unmount,
    WriteUnits,
    plan,
    target_for,
)
from agent.state import State, TreeMarker

FLATCAR = OSInfo("flatcar", "3815.2.0", "Flatcar", coreos_family=True)
KERNEL = "6.1.0-28-amd64"
TREE = "/opt/nvidia/535.261.03/flatcar-3815.2.0"
OLD_TREE = "/opt/nvidia/535.261.03/flatcar-3760.2.0"
H100 = GPU("0000:00:05.0", 0x2330, 0x030200)
S = Settings(modules=ModuleSettings(load=False))


def facts(*, gpus: tuple[GPU, ...] = (H100,), lower: str | None = None, modules_supported: bool = True) -> HostFacts:
    mounts = (Mount("/usr/lib64", "ext4", "/dev/sda", {"ro": ""}),)
    if lower is not None:
        mounts += (Mount("/usr/lib64", "overlay", "nvidia-agent", {"lowerdir": f"{lower}:/usr/lib64"}),)
    return HostFacts(FLATCAR, KERNEL, "amd64", gpus, {}, mounts, modules_supported)


def marker(tree: str = TREE) -> TreeMarker:
    return TreeMarker("535.261.03", tree.rsplit("/", 1)[1], KERNEL, "r", "sha256:x", 0.0)


INSTALL = InstallImage(target_for(S, facts()))
UNITS = WriteUnits(("kubelet.service", "dcos-mesos-slave.service"))
SWITCH = SwitchCurrent(TREE)
MOUNT = MountOverlay(f"{TREE}/lib64", "/usr/lib64")

CASES = [
    # name, facts, installed, expected actions
    ("first boot", facts(), Installed(None, None), (INSTALL, SWITCH, MOUNT, Ldconfig())),
    ("unchanged reboot: mount gone", facts(), Installed(marker(), TREE), (MOUNT, Ldconfig())),
    ("unchanged, all in place", facts(lower=f"{TREE}/lib64"), Installed(marker(), TREE), ()),
    ("installed but current elsewhere", facts(lower=f"{TREE}/lib64"), Installed(marker(), OLD_TREE), (SWITCH,)),
    ("kernel update: new tree, old mount is stale", facts(lower=f"{OLD_TREE}/lib64"), Installed(None, OLD_TREE),
     (INSTALL, SWITCH, Unmount("/usr/lib64", "shows another tree"), MOUNT, Ldconfig())),
    ("tree lost its marker while mounted", facts(lower=f"{TREE}/lib64"), Installed(None, TREE),
     (INSTALL, SWITCH, Unmount("/usr/lib64", "tree was reinstalled"), MOUNT, Ldconfig())),
    ("another driver's marker at the path", facts(), Installed(replace(marker(), driver="470.1"), TREE),
     (INSTALL, SWITCH, MOUNT, Ldconfig())),
]


@pytest.mark.parametrize(("name", "host", "installed", "actions"), CASES, ids=[c[0] for c in CASES])
def test_plan_table(name: str, host: HostFacts, installed: Installed, actions: tuple[object, ...]) -> None:
    """Each situation gets exactly the actions that bring the host to the target, in order."""
    assert plan(S, host, installed, State()).actions == (UNITS, *actions)


def test_target_names_tree_and_tag() -> None:
    """The tree is /opt/nvidia/<driver>/<os> and the tag comes from the template."""
    t = target_for(S, facts())
    assert t.tree == TREE
    assert str(t.reference) == "127.0.0.1:5000/nvidia/driver:535.261.03-flatcar-3815.2.0"


def test_no_gpu_plans_nothing() -> None:
    """A host without NVIDIA GPUs is left alone and says so."""
    p = plan(S, facts(gpus=()), Installed(None, None), State())
    assert (p.no_gpu, p.actions) == (True, (UNITS,))


def test_module_loading_when_configured_and_blocked_when_kernel_cannot() -> None:
    """Loading is the last step; a kernel without module support blocks with a reason."""
    s = Settings(modules=ModuleSettings(load=True, parameters={"nvidia": ("NVreg_X=1",)}))
    p = plan(s, facts(lower=f"{TREE}/lib64"), Installed(marker(), TREE), State())
    assert p.actions == (UNITS, LoadModules(TREE, {"nvidia": ("NVreg_X=1",)}), CreateDeviceNodes(("0000:00:05.0",)),
                         StartPersistenced(TREE))
    update = plan(s, facts(lower=f"{OLD_TREE}/lib64"), Installed(None, OLD_TREE), State())
    assert update.actions[:3] == (UNITS, INSTALL, LoadModules(TREE, {"nvidia": ("NVreg_X=1",)}, OLD_TREE)), \
        "a new driver loads before current switches, with the old tree to fall back to"
    assert isinstance(update.actions[3], SwitchCurrent)
    blocked = plan(s, facts(modules_supported=False), Installed(None, None), State())
    assert blocked.actions == (UNITS,)
    assert blocked.blocked is not None
    assert "modules.load = false" in blocked.blocked


def test_mount_disabled_plans_no_mount() -> None:
    """With mount.enabled = false the overlay is not touched."""
    s = replace(S, mount=MountSettings(enabled=False))
    assert plan(s, facts(), Installed(None, None), State()).actions == (UNITS, INSTALL, SWITCH)


@pytest.mark.parametrize(("last", "changed"), [(None, None), (KERNEL, None), ("6.1.0-27-amd64", "6.1.0-27-amd64")])
def test_kernel_change_is_noticed_from_state(last: str | None, changed: str | None) -> None:
    """The planner reports the previous kernel when the host booted another one."""
    assert plan(S, facts(), Installed(None, None), State(last_kernel=last)).kernel_changed_from == changed
