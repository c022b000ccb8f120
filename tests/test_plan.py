"""The planner: a table of host situations and the actions each one needs."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agent.config import ImageSettings, InstallSettings, ModuleSettings, MountSettings, Settings
from agent.hostfacts import GPU, HostFacts, Mount, OSInfo
from agent.plan import (
    CreateDeviceNodes,
    Installed,
    InstallImage,
    Ldconfig,
    LinkTools,
    LoadModules,
    MountOverlay,
    StartPersistenced,
    SwitchCurrent,
    Unmount,
    WriteUnits,
    plan,
    target_for,
)
from agent.state import Refusal, State, TreeMarker

FLATCAR = OSInfo("flatcar", "3815.2.0", "Flatcar", coreos_family=True)
KERNEL = "6.1.0-28-amd64"
TREE = f"/opt/nvidia/535.261.03/flatcar-3815.2.0-{KERNEL}"
OLD_TREE = "/opt/nvidia/535.261.03/flatcar-3760.2.0-6.1.0-27-amd64"
H100 = GPU("0000:00:05.0", 0x2330, 0x030200)
S = Settings(image=ImageSettings(registry="registry.example:5000"), modules=ModuleSettings(load=False),
             install=InstallSettings(bin_dir=""))  # tool links have tests of their own below


def facts(*, gpus: tuple[GPU, ...] = (H100,), lower: str | None = None, modules_supported: bool = True,
          kernel: str = KERNEL, sysext_on_top: bool = False) -> HostFacts:
    mounts = (Mount("/", "ext4", "/dev/sda", {"rw": ""}, 1, 0), Mount("/usr", "ext4", "/dev/sdb", {"ro": ""}, 2, 1))
    if lower is not None:
        mounts += (Mount("/usr/lib64", "overlay", "nvidia-agent", {"lowerdir": f"{lower}:/usr/lib64"}, 3, 2),)
    if sysext_on_top:  # systemd-sysext merged after the overlay: ours is listed, hidden
        mounts += (Mount("/usr", "overlay", "sysext", {"lowerdir": "/run/systemd/sysext/meta/usr:/usr"}, 4, 2),)
    return HostFacts(FLATCAR, kernel, "amd64", gpus, {}, mounts, modules_supported)


def marker(tree: str = TREE, kernel: str = KERNEL) -> TreeMarker:
    return TreeMarker("535.261.03", tree.rsplit("/", 1)[1], kernel, "r", "sha256:x", 0.0)


INSTALL = InstallImage(target_for(S, facts()))
UNITS = WriteUnits(("kubelet.service", "dcos-mesos-slave.service"))
SWITCH = SwitchCurrent(TREE)
MOUNT = MountOverlay(f"{TREE}/lib64", "/usr/lib64")

CASES = [
    # name, facts, installed, expected actions
    ("first boot", facts(), Installed(None, None), (INSTALL, SWITCH, MOUNT, Ldconfig())),
    ("unchanged reboot: mount gone", facts(), Installed(marker(), TREE), (MOUNT, Ldconfig())),
    ("unchanged, all in place", facts(lower=f"{TREE}/lib64"), Installed(marker(), TREE), ()),
    ("unchanged, but a sysext merge hides the overlay", facts(lower=f"{TREE}/lib64", sysext_on_top=True),
     Installed(marker(), TREE), (MOUNT, Ldconfig())),
    ("installed but current elsewhere", facts(lower=f"{TREE}/lib64"), Installed(marker(), OLD_TREE), (SWITCH,)),
    ("kernel update: new tree, old mount is stale", facts(lower=f"{OLD_TREE}/lib64"), Installed(None, OLD_TREE),
     (INSTALL, SWITCH, Unmount("/usr/lib64", "shows another tree"), MOUNT, Ldconfig())),
    ("tree lost its marker while mounted", facts(lower=f"{TREE}/lib64"), Installed(None, TREE),
     (INSTALL, SWITCH, Unmount("/usr/lib64", "tree was reinstalled"), MOUNT, Ldconfig())),
    ("another driver's marker at the path", facts(), Installed(replace(marker(), driver="470.1"), TREE),
     (INSTALL, SWITCH, MOUNT, Ldconfig())),
    ("a marker for another kernel at the path", facts(), Installed(replace(marker(), kernel="6.1.0-27-amd64"), TREE),
     (INSTALL, SWITCH, MOUNT, Ldconfig())),
]


@pytest.mark.parametrize(("name", "host", "installed", "actions"), CASES, ids=[c[0] for c in CASES])
def test_plan_table(name: str, host: HostFacts, installed: Installed, actions: tuple[object, ...]) -> None:
    """Each situation gets exactly the actions that bring the host to the target, in order."""
    assert plan(S, host, installed, State()).actions == (UNITS, *actions)


def test_target_names_tree_and_tag() -> None:
    """The tree is /opt/nvidia/<driver>/<os> and the tag comes from the template; the kernel is in
    both on CoreOS too (an RHCOS real-time kernel changes it under the same OS version)."""
    t = target_for(S, facts())
    assert t.tree == TREE
    assert str(t.reference) == f"registry.example:5000/nvidia/driver:535.261.03-flatcar-3815.2.0-{KERNEL}"
    rt = target_for(S, facts(kernel="5.14.0-284.rt14.269.el9_2.x86_64"))
    assert rt.tree != t.tree and rt.reference.tag != t.reference.tag


def test_no_gpu_plans_nothing() -> None:
    """A host without NVIDIA GPUs is left alone and says so."""
    p = plan(S, facts(gpus=()), Installed(None, None), State())
    assert (p.no_gpu, p.actions) == (True, (UNITS,))


def test_module_loading_when_configured_and_blocked_when_kernel_cannot() -> None:
    """Loading is the last step; a kernel without module support blocks with a reason."""
    s = replace(S, modules=ModuleSettings(load=True, parameters={"nvidia": ("NVreg_X=1",)}))
    p = plan(s, facts(lower=f"{TREE}/lib64"), Installed(marker(), TREE), State())
    assert p.actions == (UNITS, LoadModules(TREE, {"nvidia": ("NVreg_X=1",)}), CreateDeviceNodes(("0000:00:05.0",)),
                         StartPersistenced(TREE))
    update = plan(s, facts(lower=f"{OLD_TREE}/lib64"), Installed(None, OLD_TREE, marker(OLD_TREE)), State())
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


LOAD = replace(S, modules=ModuleSettings(load=True))


def test_a_working_tree_for_this_kernel_is_the_fallback_one_for_another_kernel_is_not() -> None:
    """While a new driver is installed, the current tree is kept to serve if it was built for the
    running kernel (a driver.version change); after a kernel change the old tree cannot load, but
    the tree that last worked with this kernel can."""
    same_kernel = Installed(None, OLD_TREE, marker(OLD_TREE))
    assert plan(LOAD, facts(), same_kernel, State()).fallback == OLD_TREE
    other_kernel = Installed(None, OLD_TREE, marker(OLD_TREE, kernel="6.1.0-27-amd64"))
    assert plan(LOAD, facts(), other_kernel, State()).fallback is None
    assert plan(LOAD, facts(), Installed(marker(), TREE, marker()), State()).fallback is None
    # booted back into a kernel (current names another kernel's tree): the tree last READY with this
    # kernel serves, if still installed; a newer tree that never worked here (the kernel may refuse it) does not
    worked, untried = "/opt/nvidia/470.1/flatcar-3815.2.0-" + KERNEL, "/opt/nvidia/525.1/flatcar-3815.2.0-" + KERNEL
    trees = ((worked, replace(marker(worked), installed_at=1.0)), (untried, replace(marker(untried), installed_at=2.0)),
             (OLD_TREE, marker(OLD_TREE, kernel="6.1.0-27-amd64")), (TREE, marker()))
    rolled_back = replace(other_kernel, trees=trees)
    assert plan(LOAD, facts(), rolled_back, State(working={KERNEL: worked})).fallback == worked
    assert plan(LOAD, facts(), rolled_back, State()).fallback is None
    gone = replace(rolled_back, trees=trees[1:])
    assert plan(LOAD, facts(), gone, State(working={KERNEL: worked})).fallback is None


def test_a_refused_digest_is_resolved_again_before_it_is_loaded_again() -> None:
    """The kernel refused this tree's digest: the plan asks the registry whether the digest changed
    (InstallImage with refuse_digest) instead of unloading the working driver for the same result.
    Another kernel, other module parameters or another digest end the refusal."""
    refusal = Refusal(TREE, "sha256:x", KERNEL, '[]', "insmod: Invalid module format", 1.0)
    installed = Installed(marker(), OLD_TREE, marker(OLD_TREE))
    refused = plan(LOAD, facts(), installed, State(refused=refusal))
    assert refused.actions[1] == InstallImage(target_for(LOAD, facts()), refuse_digest="sha256:x")
    assert refused.refused == refusal and refused.fallback == OLD_TREE
    params = replace(LOAD, modules=ModuleSettings(load=True, parameters={"nvidia": ("NVreg_X=1",)}))
    for other in (plan(params, facts(), installed, State(refused=refusal)),
                  plan(LOAD, facts(), Installed(replace(marker(), digest="sha256:y"), OLD_TREE),
                       State(refused=refusal))):
        assert other.refused is None
        assert not any(isinstance(a, InstallImage) for a in other.actions)


def test_a_symlinked_mount_target_is_compared_by_its_real_path() -> None:
    """mount.target /lib64 -> usr/lib64 (Fedora): mountinfo names /usr/lib64, and so must the plan,
    or every re-check would stack another overlay."""
    mounted = replace(facts(lower=f"{TREE}/lib64"), lib_dir="/usr/lib64")
    settings = replace(S, mount=MountSettings(target="/lib64"))
    assert plan(settings, mounted, Installed(marker(), TREE), State()).actions == (UNITS,)
    fresh = plan(settings, replace(facts(), lib_dir="/usr/lib64"), Installed(marker(), TREE), State())
    assert fresh.actions == (UNITS, MountOverlay(f"{TREE}/lib64", "/usr/lib64"), Ldconfig())


LINKED = S.install.root + "/current/bin/nvidia-smi"
WITH_LINKS = replace(S, install=InstallSettings(bin_dir="auto"))


@pytest.mark.parametrize(("name", "installed", "link"), [
    ("first boot: link after the switch", Installed(None, None), True),
    ("current stays and its tools are linked", Installed(marker(), TREE, marker(), current_tools=frozenset(
        {"nvidia-smi"}), links={"nvidia-smi": LINKED}), False),
    ("current stays, a link is missing", Installed(marker(), TREE, marker(), current_tools=frozenset(
        {"nvidia-smi"}), links={"nvidia-smi": None}), True),
    ("current stays, a link names a tool it lacks", Installed(marker(), TREE, marker(), current_tools=frozenset(),
                                                              links={"nvidia-smi": LINKED}), True),
    ("current stays, the name is another tool's", Installed(marker(), TREE, marker(), current_tools=frozenset(
        {"nvidia-smi"}), links={"nvidia-smi": "/usr/bin/nvidia-smi"}), False),
])
def test_tool_links_are_planned_only_when_they_differ(name: str, installed: Installed, link: bool) -> None:
    """install.bin_dir "auto" is /opt/bin on Flatcar; links go through `current`, so a pass where
    `current` and its tools stay plans none; a foreign nvidia-smi is never a reason to act."""
    actions = plan(WITH_LINKS, facts(lower=f"{TREE}/lib64"), installed, State()).actions
    assert (LinkTools("/opt/bin") in actions) is link, actions
    if link and any(isinstance(a, SwitchCurrent) for a in actions):
        assert actions.index(LinkTools("/opt/bin")) == actions.index(SWITCH) + 1
