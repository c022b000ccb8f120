"""Load: insert the tree's kernel modules in dependency order, idempotently, with configured parameters.

Proven on a real kernel in the QEMU guest (tests/vm); this machine's kernel cannot load modules.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import subp
from agent.devices import container_id, holders_of_nodes
from agent.errors import HostError
from agent.hostfacts import read_modules
from agent.install.modinfo import ModInfo, read_modinfo
from agent.install.verify import load_order, parse_manifest

Run = Callable[..., subp.Completed]
ContainerNames = Callable[[list[str]], dict[str, str]]  # container IDs -> names (the docker engine)


class ModulesRefused(HostError):
    """The kernel would not take the tree's modules (insmod failed, or another version stayed)."""


class ModulesBusy(HostError):
    """Another version of the modules is loaded and in use: unloading it would take GPUs from workloads."""


@dataclass(frozen=True)
class LoadPlan:
    unload: tuple[str, ...]  # loaded at another version, dependents first
    load: tuple[tuple[str, Path, tuple[str, ...]], ...]  # (name, .ko, parameters), dependencies first
    host_deps: tuple[str, ...]  # dependencies outside the image, from the host's module tree
    expected: dict[str, str]  # name -> version the tree carries


def tree_modules(tree: Path) -> tuple[list[ModInfo], dict[str, Path]]:
    """The tree's modules in load order, and where each file is."""
    manifest = parse_manifest((tree / "manifest.json").read_bytes())
    infos, paths = {}, {}
    for rel in manifest.modules:
        info = read_modinfo(tree / rel)
        infos[info.name] = info
        paths[info.name] = tree / rel
    return list(load_order(infos)), paths


def plan_loads(order: list[ModInfo], paths: Mapping[str, Path], loaded: Mapping[str, str],
               parameters: Mapping[str, tuple[str, ...]]) -> LoadPlan:
    """Pure: what to unload, what to insert, which host modules to pull in first."""
    names = {m.name for m in order}
    stale = any(m.name in loaded and loaded[m.name] != m.version for m in order)
    # Another version of any of our modules: unload all of ours that are loaded (dependents
    # first) and load the tree's whole set; otherwise insert only what is missing.
    unload = tuple(m.name for m in reversed(order) if m.name in loaded) if stale else ()
    present = set() if stale else {m.name for m in order if m.name in loaded}
    load = tuple((m.name, paths[m.name], parameters.get(m.name, parameters.get(m.name.replace("_", "-"), ())))
                 for m in order if m.name not in present)
    host_deps = tuple(sorted({d for m in order for d in m.depends if d not in names}))
    return LoadPlan(unload, load, host_deps, {m.name: m.version for m in order})


def module_holders(sys_module: Path, proc: Path, names: tuple[str, ...],
                   ours: frozenset[int] = frozenset(), containers: ContainerNames | None = None) -> list[str]:
    """Who keeps modules busy: holder modules outside the set, processes with /dev/nvidia* open,
    with the container each runs in (its ID from /proc/PID/cgroup, its name from `containers`,
    the docker engine, where there is one).

    Processes in `ours` (the agent's own nvidia-persistenced) do not count: the agent stops them
    before unloading. References no visible process explains count only if none of ours could.
    """
    found, refs = [], []
    for name in names:
        base = sys_module / name
        try:
            refcnt = int((base / "refcnt").read_text().strip() or 0)
            holders = sorted(p.name for p in (base / "holders").iterdir())
        except (OSError, ValueError):
            continue
        outside = [h for h in holders if h not in names]
        if outside:
            found.append(f"{name} used by module(s) {', '.join(outside)}")
        # Each holder module takes one reference; the rest are open files.
        if refcnt > len(holders):
            refs.append(f"{name} refcount {refcnt}")
    users = [p for p in holders_of_nodes(proc) if int(p.split()[0]) not in ours]
    if users:
        return found + refs + _in_containers(proc, users, containers)
    return found + (refs if not ours else [])


def _in_containers(proc: Path, users: list[str], containers: ContainerNames | None) -> list[str]:
    """'pid 4242 (python3) /dev/nvidia0 in container trainer (3f2a9c1d0b7e)' where a container holds it."""
    ids: dict[str, str] = {}
    for user in users:
        pid = user.split()[0]
        with contextlib.suppress(OSError, UnicodeDecodeError):
            found = container_id((proc / pid / "cgroup").read_text())
            if found:
                ids[pid] = found
    names = containers(sorted(set(ids.values()))) if containers and ids else {}
    out = []
    for user in users:
        cid = ids.get(user.split()[0])
        where = ""
        if cid:
            where = f" in container {names[cid]} ({cid[:12]})" if cid in names else f" in container {cid[:12]}"
        out.append(f"pid {user}{where}")
    return out


def load_modules(tree: Path, host_root: Path, parameters: Mapping[str, tuple[str, ...]],
                 run: Run = subp.run, *, ours: frozenset[int] = frozenset(),
                 before_unload: Callable[[], object] = lambda: None,
                 containers: ContainerNames | None = None) -> dict[str, str]:
    """Bring the loaded modules to the tree's versions; returns name -> loaded version.

    `ours` are PIDs the agent itself runs against the driver (nvidia-persistenced), stopped by
    `before_unload` once it is clear nothing else holds the modules.
    """
    sys_module = host_root / "sys/module"
    order, paths = tree_modules(tree)
    plan = plan_loads(order, paths, read_modules(sys_module), parameters)
    if plan.unload:
        busy = module_holders(sys_module, host_root / "proc", plan.unload, ours, containers)
        if busy:
            raise ModulesBusy(f"loaded nvidia modules are another version and in use: {'; '.join(busy)}",
                            hint="stop the GPU workloads (or drain the node), then: systemctl reload nvidia-agent")
        before_unload()
        for name in plan.unload:
            _kernel_call(run, ["rmmod", name], name, "unloading")
    modprobe = ["modprobe"] if host_root == Path("/") else ["modprobe", "-d", str(host_root)]
    for dep in plan.host_deps:
        _kernel_call(run, [*modprobe, dep], dep, "loading host dependency")
    for name, path, params in plan.load:
        _kernel_call(run, ["insmod", str(path), *params], name, "loading")
    now = read_modules(sys_module)
    wrong = {n: now.get(n) for n, v in plan.expected.items() if now.get(n) != v}
    if wrong:
        raise ModulesRefused("modules not at the tree's version after loading: "
                        + ", ".join(f"{n} {v or 'missing'} (want {plan.expected[n]})" for n, v in wrong.items()))
    return {n: now[n] for n in plan.expected}


# What the kernel's refusals usually mean, keyed by the strerror insmod prints.
KERNEL_HINTS = (
    ("Key was rejected by service", "Secure Boot / lockdown refuses unsigned modules: sign the image's modules with "
                                    "a key enrolled in the MOK database (mokutil --import), or disable Secure Boot"),
    ("Required key not available", "Secure Boot / lockdown refuses unsigned modules: sign the image's modules with "
                                   "a key enrolled in the MOK database (mokutil --import), or disable Secure Boot"),
    ("Invalid module format", "the module was built for another kernel (vermagic or symbol versions differ): "
                              "rebuild the image for this kernel"),
    ("Unknown symbol", "a dependency is missing or was built for another kernel; the kernel log names the symbol"),
    ("No such device", "the driver found no GPU it can drive: check `lspci -d 10de:` and the kernel log"),
)


def _kernel_call(run: Run, argv: list[str], name: str, what: str) -> None:
    """Run insmod/rmmod/modprobe; on failure the kernel's own words (and its log) reach the error."""
    try:
        run(argv)
    except subp.SubpError as exc:
        reason = (exc.stderr or exc.stdout).strip() or str(exc)
        if argv[0] == "insmod" and "File exists" in reason:
            return  # loaded meanwhile (udev autoload): the version check after loading decides
        kernel_log = _recent_kernel_lines(run, name)
        detail = f"; kernel log: {kernel_log}" if kernel_log else ""
        hint = next((h for key, h in KERNEL_HINTS if key in reason), None)
        error = ModulesRefused if argv[0] == "insmod" else HostError
        raise error(f"{what} {name} failed: {reason}{detail}", hint=hint) from exc


def _recent_kernel_lines(run: Run, name: str, count: int = 3) -> str:
    try:
        out = run(["dmesg", "--notime"], check=False).stdout
    except subp.SubpError:
        return ""
    keys = (name, name.replace("_", "-"), "NVRM")
    lines = [line.strip() for line in out.splitlines() if any(k in line for k in keys)]
    return " | ".join(lines[-count:])
