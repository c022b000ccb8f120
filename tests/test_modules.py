"""Module loading: the plan (unload, host deps, insert order, parameters) and its execution against a fake kernel."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import subp
from agent.devices import container_id
from agent.errors import HostError
from agent.install.modinfo import ModInfo
from agent.modules import load_modules, module_holders, plan_loads
from support.images import make_driver_tree
from tests.conftest import write

ORDER = [ModInfo("nvidia", "", "535.1", (), {}), ModInfo("nvidia_modeset", "", "535.1", ("nvidia",), {}),
         ModInfo("nvidia_drm", "", "535.1", ("drm", "nvidia_modeset"), {}),
         ModInfo("nvidia_uvm", "", "535.1", ("nvidia",), {})]
PATHS = {m.name: Path(f"/t/{m.name}.ko") for m in ORDER}


@pytest.mark.parametrize(("loaded", "unload", "load"), [
    ({}, (), ("nvidia", "nvidia_modeset", "nvidia_drm", "nvidia_uvm")),
    ({"nvidia": "535.1", "nvidia_uvm": "535.1"}, (), ("nvidia_modeset", "nvidia_drm")),
    ({m.name: "535.1" for m in ORDER}, (), ()),
    ({"nvidia": "470.9", "nvidia_uvm": "470.9"}, ("nvidia_uvm", "nvidia"),
     ("nvidia", "nvidia_modeset", "nvidia_drm", "nvidia_uvm")),
    ({"nvidia": "535.1", "nvidia_drm": "470.9"}, ("nvidia_drm", "nvidia"),
     ("nvidia", "nvidia_modeset", "nvidia_drm", "nvidia_uvm")),
])
def test_load_plan(loaded: dict[str, str], unload: tuple[str, ...], load: tuple[str, ...]) -> None:
    """Right versions are left alone; any other version means unloading ours dependents-first and reloading all."""
    plan = plan_loads(ORDER, PATHS, loaded, {"nvidia": ("NVreg_X=1",), "nvidia-uvm": ("uvm_p=2",)})
    assert plan.unload == unload
    assert tuple(name for name, _, _ in plan.load) == load
    assert plan.host_deps == ("drm",)
    params = {name: p for name, _, p in plan.load}
    if "nvidia" in params:
        assert params["nvidia"] == ("NVreg_X=1",)
    if "nvidia_uvm" in params:
        assert params["nvidia_uvm"] == ("uvm_p=2",)  # configured under the file name with a dash


class FakeKernel:
    """Records module commands and keeps /sys/module in a temp root in step, like the kernel would."""

    def __init__(self, root: Path, fail: dict[str, str] | None = None) -> None:
        self.root = root
        self.calls: list[list[str]] = []
        self.fail = fail or {}

    def __call__(self, argv: list[str], check: bool = True, **_: object) -> subp.Completed:
        self.calls.append(list(argv))
        if argv[0] == "dmesg":
            return subp.Completed(tuple(argv), 0, "[x] NVRM: No NVIDIA GPU found.\n[y] unrelated\n", "")
        name = Path(argv[1]).name.removesuffix(".ko").replace("-", "_") if argv[0] in ("insmod", "rmmod") else argv[-1]
        if name in self.fail:
            raise subp.SubpError(argv, 1, "", self.fail[name])
        if argv[0] == "insmod":
            write(self.root / f"sys/module/{name}/initstate", "live\n")
            write(self.root / f"sys/module/{name}/version", "535.261.03\n")
        elif argv[0] == "rmmod":
            for f in (self.root / f"sys/module/{name}").iterdir():
                f.unlink()
            (self.root / f"sys/module/{name}").rmdir()
        return subp.Completed(tuple(argv), 0, "", "")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    from support.images import run_build_script  # noqa: PLC0415

    t = make_driver_tree(tmp_path / "tree", driver="535.261.03", kernel="6.1.0-28-amd64")
    run_build_script("--manifest-only", "--driver-version", "535.261.03", "--os-id", "debian", "--os-version", "12",
                     "--kernel-release", "6.1.0-28-amd64", t)
    return t


@pytest.mark.subprocess
def test_load_inserts_in_order_after_host_deps(tmp_path: Path, tree: Path) -> None:
    """modprobe for host dependencies (from the host root's tree), then insmod each module with its parameters."""
    root = tmp_path / "host"
    (root / "sys/module").mkdir(parents=True)
    kernel = FakeKernel(root)
    versions = load_modules(tree, root, {"nvidia": ("NVreg_X=1",)}, run=kernel)
    assert kernel.calls[0] == ["modprobe", "-d", str(root), "drm"]
    inserted = [Path(c[1]).name for c in kernel.calls if c[0] == "insmod"]
    assert inserted == ["nvidia.ko", "nvidia-modeset.ko", "nvidia-drm.ko", "nvidia-uvm.ko"]
    assert kernel.calls[1][2:] == ["NVreg_X=1"]
    assert versions == dict.fromkeys(("nvidia", "nvidia_modeset", "nvidia_drm", "nvidia_uvm"), "535.261.03")
    kernel.calls.clear()
    load_modules(tree, root, {}, run=kernel)
    assert [c[0] for c in kernel.calls] == ["modprobe"], "already loaded at the right version: nothing inserted"


@pytest.mark.subprocess
def test_kernel_refusal_is_reported_verbatim_with_the_module(tmp_path: Path, tree: Path) -> None:
    """insmod's own words and the kernel's NVRM lines reach the error."""
    root = tmp_path / "host"
    (root / "sys/module").mkdir(parents=True)
    kernel = FakeKernel(root, fail={"nvidia": "insmod: ERROR: could not insert module nvidia.ko: No such device"})
    with pytest.raises(HostError) as err:
        load_modules(tree, root, {}, run=kernel)
    assert "loading nvidia failed: insmod: ERROR: could not insert module nvidia.ko: No such device" in str(err.value)
    assert "NVRM: No NVIDIA GPU found." in str(err.value)


@pytest.mark.subprocess
def test_busy_modules_of_another_version_are_not_unloaded(tmp_path: Path, tree: Path) -> None:
    """A held module is never removed: the error names the refcount and the process holding /dev/nvidia0."""
    root = tmp_path / "host"
    for name, refcnt in (("nvidia", "2"), ("nvidia_uvm", "0")):
        write(root / f"sys/module/{name}/initstate", "live\n")
        write(root / f"sys/module/{name}/version", "470.1\n")
        write(root / f"sys/module/{name}/refcnt", refcnt + "\n")
        (root / f"sys/module/{name}/holders").mkdir()
    (root / "sys/module/nvidia/holders/nvidia_uvm").mkdir()
    (root / "proc/4242/fd").mkdir(parents=True)
    (root / "proc/4242/fd/5").symlink_to("/dev/nvidia0")
    write(root / "proc/4242/comm", "cuda-app\n")
    kernel = FakeKernel(root)
    with pytest.raises(HostError) as err:
        load_modules(tree, root, {}, run=kernel)
    assert "nvidia refcount 2" in str(err.value)
    assert "pid 4242 (cuda-app) /dev/nvidia0" in str(err.value)
    assert not [c for c in kernel.calls if c[0] == "rmmod"]


def test_holders_ignore_our_own_dependents(tmp_path: Path) -> None:
    """nvidia held only by nvidia_uvm (which goes too) is not busy."""
    for name, refcnt in (("nvidia", "1"), ("nvidia_uvm", "0")):
        write(tmp_path / f"sys/module/{name}/refcnt", refcnt + "\n")
        (tmp_path / f"sys/module/{name}/holders").mkdir(parents=True)
    (tmp_path / "sys/module/nvidia/holders/nvidia_uvm").mkdir()
    (tmp_path / "proc").mkdir()
    assert module_holders(tmp_path / "sys/module", tmp_path / "proc", ("nvidia_uvm", "nvidia")) == []


@pytest.mark.parametrize(("users", "ours", "busy"), [
    ({}, frozenset(), ["nvidia refcount 1"]),                       # a reference nobody visible explains
    ({77: "nvidia-persistenced"}, frozenset({77}), []),             # only our persistenced: we stop it
    ({77: "nvidia-persistenced", 42: "cuda-app"}, frozenset({77}),
     ["nvidia refcount 1", "pid 42 (cuda-app) /dev/nvidia0"]),
])
def test_holders_leave_out_our_own_persistenced(tmp_path: Path, users: dict[int, str], ours: frozenset[int],
                                                busy: list[str]) -> None:
    """The agent's nvidia-persistenced holds /dev/nvidiactl by design; it does not make the driver busy."""
    write(tmp_path / "sys/module/nvidia/refcnt", "1\n")
    (tmp_path / "sys/module/nvidia/holders").mkdir(parents=True)
    (tmp_path / "proc").mkdir()
    for pid, comm in users.items():
        (tmp_path / f"proc/{pid}/fd").mkdir(parents=True)
        (tmp_path / f"proc/{pid}/fd/3").symlink_to("/dev/nvidiactl" if comm.startswith("nvidia") else "/dev/nvidia0")
        write(tmp_path / f"proc/{pid}/comm", comm + "\n")
    assert module_holders(tmp_path / "sys/module", tmp_path / "proc", ("nvidia",), ours) == busy


@pytest.mark.subprocess
@pytest.mark.parametrize(("stderr", "hint"), [
    ("insmod: ERROR: could not insert module nvidia.ko: Key was rejected by service", "Secure Boot"),
    ("insmod: ERROR: could not insert module nvidia.ko: Invalid module format", "built for another kernel"),
    ("insmod: ERROR: could not insert module nvidia.ko: Unknown symbol in module", "dependency is missing"),
])
def test_known_kernel_refusals_carry_a_hint(tmp_path: Path, tree: Path, stderr: str, hint: str) -> None:
    """The kernel's words stay verbatim; a hint says what they usually mean (secure boot, wrong kernel)."""
    root = tmp_path / "host"
    (root / "sys/module").mkdir(parents=True)
    with pytest.raises(HostError) as err:
        load_modules(tree, root, {}, run=FakeKernel(root, fail={"nvidia": stderr}))
    assert stderr in err.value.message
    assert err.value.hint is not None
    assert hint in err.value.hint


@pytest.mark.subprocess
def test_file_exists_is_a_race_not_a_failure(tmp_path: Path, tree: Path) -> None:
    """insmod racing udev's autoload ('File exists') is fine when the loaded version is the tree's."""
    root = tmp_path / "host"
    (root / "sys/module").mkdir(parents=True)
    kernel = FakeKernel(root)

    def racing(argv: list[str], check: bool = True, **kw: object) -> subp.Completed:
        if argv[0] == "insmod" and argv[1].endswith("/nvidia.ko"):
            kernel(argv)  # udev got there first ...
            raise subp.SubpError(argv, 1, "", "insmod: ERROR: could not insert module nvidia.ko: File exists")
        return kernel(argv, check)

    versions = load_modules(tree, root, {}, run=racing)
    assert versions["nvidia"] == "535.261.03"


CID = "3f2a9c1d0b7e" + "ab" * 26


@pytest.mark.parametrize("cgroup", [
    f"12:pids:/docker/{CID}\n11:memory:/docker/{CID}\n",  # cgroup v1, cgroupfs driver
    f"0::/system.slice/docker-{CID}.scope\n",  # v2, systemd driver
    f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1a.slice/cri-containerd-{CID}.scope\n",
    f"0::/kubepods/besteffort/pod0c6a3d2e-1111-2222-3333-444455556666/{CID}\n",  # kubelet, cgroupfs driver
    f"0::/machine.slice/libpod-{CID}.scope\n",  # podman
    f"0::/kubepods.slice/kubepods-pod1.slice/crio-{CID}.scope\n",  # CRI-O
])
def test_the_container_of_a_process_is_read_from_its_cgroup(cgroup: str) -> None:
    assert container_id(cgroup) == CID


@given(st.lists(st.text(alphabet="0123456789abcdef/:.-_sclopedkr\n", max_size=80), max_size=4),
       st.sampled_from(["", "/", "-", ":", "x", "a"]), st.sampled_from(["", ".scope", "0", "/x", ".scopex"]))
def test_an_id_is_found_only_where_it_ends_a_path_component(noise: list[str], before: str, after: str) -> None:
    """64 hex digits name a container only after `/`, `:` or `-` and before the line's end or `.scope`."""
    line = f"0::/system.slice/docker{before}{CID}{after}"
    whole = before in ("/", "-", ":") and after in ("", ".scope")
    text = "\n".join([*(n.replace(CID[:8], "") for n in noise), line])
    found = container_id(text)
    if whole:
        assert found is not None  # this line, or an earlier noise line that is itself a whole component
        assert found == CID or any(f"{found}" in n for n in noise)
    else:
        assert found is None or any(found in n for n in noise), (text, found)


def test_busy_holders_name_their_container(tmp_path: Path) -> None:
    """A process in a container: its ID from its cgroup, its name from the engine (a callable here;
    tests/test_engine.py asks a real dockerd about a real container's cgroup); a host process stays as it was."""
    write(tmp_path / "sys/module/nvidia/refcnt", "2\n")
    (tmp_path / "sys/module/nvidia/holders").mkdir(parents=True)
    for pid, cgroup in ((42, f"0::/system.slice/docker-{CID}.scope\n"), (43, "0::/user.slice/session-1.scope\n")):
        (tmp_path / f"proc/{pid}/fd").mkdir(parents=True)
        (tmp_path / f"proc/{pid}/fd/3").symlink_to("/dev/nvidia0")
        write(tmp_path / f"proc/{pid}/comm", "python3\n")
        write(tmp_path / f"proc/{pid}/cgroup", cgroup)
    asked: list[list[str]] = []

    def names(ids: list[str]) -> dict[str, str]:
        asked.append(ids)
        return {CID: "trainer"}

    busy = module_holders(tmp_path / "sys/module", tmp_path / "proc", ("nvidia",), containers=names)
    assert busy == ["nvidia refcount 2", f"pid 42 (python3) /dev/nvidia0 in container trainer ({CID[:12]})",
                    "pid 43 (python3) /dev/nvidia0"]
    assert asked == [[CID]]
    unnamed = module_holders(tmp_path / "sys/module", tmp_path / "proc", ("nvidia",))
    assert f"pid 42 (python3) /dev/nvidia0 in container {CID[:12]}" in unnamed
