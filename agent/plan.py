"""Decide: from settings, host facts and what is installed, the actions that bring the host to the target."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from agent.config import Settings
from agent.hostfacts import HostFacts, OSInfo, os_key
from agent.mount import MountState, classify
from agent.reference import Reference, render_tag
from agent.state import Refusal, State, TreeMarker
from agent.tools import bin_dir_for, plan_links


@dataclass(frozen=True)
class Target:
    """The driver tree this host should run, in host paths."""

    driver: str
    os_key: str
    kernel: str
    reference: Reference
    tree: str  # /opt/nvidia/<driver>/<os>
    lib64: str  # <tree>/lib64


@dataclass(frozen=True)
class Installed:
    """What is on disk: the target tree's marker (None if not installed) and where `current` points."""

    marker: TreeMarker | None
    current: str | None  # host path `current` resolves to
    current_marker: TreeMarker | None = None  # the marker of the tree `current` points at
    trees: tuple[tuple[str, TreeMarker], ...] = ()  # every complete tree (host path, marker)
    current_tools: frozenset[str] | None = None  # the known tools in `current`'s bin/ (None: no current)
    links: Mapping[str, str | None] = field(default_factory=dict)  # tool -> what install.bin_dir holds for it


# --- actions: plain data, carried out by agent.reconcile

@dataclass(frozen=True)
class InstallImage:
    target: Target
    refuse_digest: str | None = None  # the kernel refused this digest: resolve, and stop if it is still that


@dataclass(frozen=True)
class SwitchCurrent:
    tree: str


@dataclass(frozen=True)
class Unmount:
    path: str
    reason: str


@dataclass(frozen=True)
class MountOverlay:
    lower: str
    path: str


@dataclass(frozen=True)
class Ldconfig:
    pass


@dataclass(frozen=True)
class LoadModules:
    tree: str
    parameters: dict[str, tuple[str, ...]]
    fallback: str | None = None  # the tree to reload if this one's modules fail after the old were unloaded


@dataclass(frozen=True)
class CreateDeviceNodes:
    gpu_slots: tuple[str, ...]  # PCI slots in bus order: /dev/nvidia<N> is the N-th


@dataclass(frozen=True)
class StartPersistenced:
    tree: str


@dataclass(frozen=True)
class LinkTools:
    bin_dir: str  # link the tools of the tree `current` names here (and unlink what it lacks)


@dataclass(frozen=True)
class WriteUnits:
    before: tuple[str, ...]  # units that must wait for the agent's READY


Action = (WriteUnits | InstallImage | SwitchCurrent | LinkTools | Unmount | MountOverlay | Ldconfig | LoadModules
          | CreateDeviceNodes | StartPersistenced)


@dataclass(frozen=True)
class Plan:
    target: Target
    actions: tuple[Action, ...]
    no_gpu: bool
    kernel_changed_from: str | None
    blocked: str | None = None  # why the target cannot be reached on this host at all
    fallback: str | None = None  # a working tree for this kernel to keep serving if the target fails
    refused: Refusal | None = None  # the target's digest was refused by this kernel before


def parameters_key(settings: Settings) -> str:
    """The module parameters as one comparable string (a refusal holds only for the same ones)."""
    return json.dumps(sorted((k, list(v)) for k, v in settings.modules.parameters.items()))


def target_for(settings: Settings, facts: HostFacts, state: State | None = None,
               installed: Installed | None = None) -> Target:
    """The tree this boot runs: the configured one, or the one `nvidia-agent rollback` pinned."""
    configured = target_for_boot(settings, facts.os, facts.kernel, facts.arch)
    return pinned_target(configured, facts.kernel, state, installed) or configured


def pinned_target(configured: Target, kernel: str, state: State | None, installed: Installed | None) -> Target | None:
    """The rolled-back-to tree while the pin holds: same kernel, same configured target (a new
    driver.version, another OS version or kernel ends it), the tree still installed for this OS
    and kernel, and from the configured registry and repository (a reinstall of it pulls from
    there: another one was not asked for)."""
    pin = state.pinned if state is not None else None
    if pin is None or installed is None or (pin.kernel, pin.instead_of) != (kernel, configured.tree):
        return None
    for tree, marker in installed.trees:
        if tree == pin.tree and (marker.kernel, marker.os_key) == (kernel, configured.os_key):
            try:
                ref = Reference.parse(marker.reference)
            except ValueError:
                return None
            if (ref.registry, ref.repository) != (configured.reference.registry, configured.reference.repository):
                return None
            return Target(marker.driver, marker.os_key, kernel, ref, tree, str(PurePosixPath(tree) / "lib64"))
    return None


def rollback_candidate(installed: Installed, configured: Target, state: State) -> tuple[str, TreeMarker] | None:
    """The tree `nvidia-agent rollback` goes back to: of the trees for this OS and kernel (other
    driver versions) that are not the configured one, the staged one or a refused one, the newest
    installed before the one running now (the pinned one after an earlier rollback, else the
    newest)."""
    excluded = {configured.tree, state.staged, state.refused.tree if state.refused else None}
    others = [(tree, m) for tree, m in installed.trees
              if (m.kernel, m.os_key) == (configured.kernel, configured.os_key) and tree not in excluded]
    if state.pinned is not None:
        pinned_at = next((m.installed_at for t, m in installed.trees if t == state.pinned.tree), None)
        if pinned_at is not None:
            others = [(t, m) for t, m in others if t != state.pinned.tree and m.installed_at < pinned_at]
    return max(others, key=lambda t: t[1].installed_at) if others else None


def target_for_boot(settings: Settings, os_: OSInfo, kernel: str, arch: str) -> Target:
    """The tree and image for a boot of `os_` with `kernel`: this one, or the next one an update stages."""
    key = os_key(os_, kernel)
    fields = {"driver": settings.driver.version, "os": key, "os_id": os_.id,
              "os_version": os_.version, "kernel": kernel, "arch": arch}
    tag = render_tag(settings.image.tag_template, fields)
    pins = settings.image.pins
    ref = Reference(settings.image.registry, settings.image.repository, tag=tag,
                    digest=pins.get(tag) or pins.get(key))  # a pinned digest: nothing else is accepted
    tree = PurePosixPath(settings.install.root) / settings.driver.version / key
    return Target(settings.driver.version, key, kernel, ref, str(tree), str(tree / "lib64"))


def plan(settings: Settings, facts: HostFacts, installed: Installed, state: State) -> Plan:
    """The actions, in order. Pure: the same inputs always give the same plan."""
    target = target_for(settings, facts, state, installed)
    changed = state.last_kernel if state.last_kernel and state.last_kernel != facts.kernel else None
    # Ordering first: it must be in place for the next boot even if this install fails.
    units = (WriteUnits(settings.units.before),)
    if not facts.gpus:
        return Plan(target, units, no_gpu=True, kernel_changed_from=changed)
    if settings.modules.load and not facts.modules_supported:
        return Plan(target, units, no_gpu=False, kernel_changed_from=changed,
                    blocked="this kernel cannot load modules (no /proc/modules); set modules.load = false "
                            "if another tool loads the driver")
    marker = installed.marker
    refused = state.refused if state.refused is not None and marker is not None and state.refused.matches(
        target.tree, marker.digest, facts.kernel, parameters_key(settings)) else None
    fresh = marker is None or (marker.driver, marker.os_key, marker.kernel) != (
        target.driver, target.os_key, facts.kernel)
    actions: list[Action] = list(units)
    if fresh or refused:
        actions.append(InstallImage(target, refuse_digest=refused.digest if refused else None))
    fallback = fallback_tree(installed, target.tree, facts.kernel, state.working.get(facts.kernel))
    bin_dir = bin_dir_for(settings.install.bin_dir, facts.os.id)
    linked = bin_dir is None or not plan_links(settings.install.root, installed.current_tools, installed.links)
    actions += activate(settings, facts, target.tree, installed.current, reinstalled=fresh or bool(refused),
                        fallback=fallback, linked=linked)
    return Plan(target, tuple(actions), no_gpu=False, kernel_changed_from=changed, fallback=fallback,
                refused=refused)


def fallback_tree(installed: Installed, target_tree: str, kernel: str, last_working: str | None) -> str | None:
    """A tree known to work with this kernel, to keep serving if the target cannot be had: `current`
    if it was built for this kernel (it became current only after its modules loaded), else the
    tree that was last READY with this kernel (after a boot back into it), if still installed.
    Never the target itself, and never a tree merely installed: the kernel may refuse that one."""
    if installed.current not in (None, target_tree) and installed.current_marker is not None \
            and installed.current_marker.kernel == kernel:
        return installed.current
    if last_working is not None and last_working != target_tree and any(
            tree == last_working and marker.kernel == kernel for tree, marker in installed.trees):
        return last_working
    return None


def plan_serving(settings: Settings, facts: HostFacts, tree: str, current: str | None) -> tuple[Action, ...]:
    """Keep an installed tree working (the fallback while the target cannot be had): no install."""
    return tuple(activate(settings, facts, tree, current, reinstalled=False, fallback=None, linked=False))


def activate(settings: Settings, facts: HostFacts, tree: str, current: str | None, *, reinstalled: bool,
             fallback: str | None, linked: bool) -> list[Action]:
    """Load, switch `current`, link tools, overlay and make nodes for an installed `tree`, skipping what
    is in place (`linked`: the tool links already match `current`, and `current` stays)."""
    lib64 = str(PurePosixPath(tree) / "lib64")
    actions: list[Action] = []
    if settings.modules.load:
        # Load before switching: if the new driver does not load, `current` and the overlay stay
        # on the previous one, and its modules are put back.
        actions.append(LoadModules(tree, dict(settings.modules.parameters), fallback))
    if reinstalled or current != tree:
        actions.append(SwitchCurrent(tree))
    bin_dir = bin_dir_for(settings.install.bin_dir, facts.os.id)
    if bin_dir is not None and (reinstalled or current != tree or not linked):
        actions.append(LinkTools(bin_dir))
    if settings.mount.enabled:
        state_now = classify(facts.lib_mount, lib64)
        # A reinstall exchanges the tree under a live mount: remount so it shows the new files.
        if state_now is MountState.STALE or (state_now is MountState.OURS and reinstalled):
            actions.append(Unmount(facts.lib_dir, "shows another tree" if state_now is MountState.STALE
                                   else "tree was reinstalled"))
        if state_now is not MountState.OURS or reinstalled:
            actions.append(MountOverlay(lib64, facts.lib_dir))
            if settings.mount.ldconfig:
                actions.append(Ldconfig())
    if settings.modules.load:
        actions += [CreateDeviceNodes(tuple(g.pci_slot for g in facts.gpus)), StartPersistenced(tree)]
    return actions
