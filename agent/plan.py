"""Decide: from settings, host facts and what is installed, the actions that bring the host to the target."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath

from agent.config import Settings
from agent.hostfacts import HostFacts, os_key
from agent.mount import MountState, classify
from agent.reference import Reference, render_tag
from agent.state import State, TreeMarker


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


# --- actions: plain data, carried out by agent.reconcile

@dataclass(frozen=True)
class InstallImage:
    target: Target


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
class WriteUnits:
    before: tuple[str, ...]  # units that must wait for the agent's READY


Action = (WriteUnits | InstallImage | SwitchCurrent | Unmount | MountOverlay | Ldconfig | LoadModules
          | CreateDeviceNodes | StartPersistenced)


@dataclass(frozen=True)
class Plan:
    target: Target
    actions: tuple[Action, ...]
    no_gpu: bool
    kernel_changed_from: str | None
    blocked: str | None = None  # why the target cannot be reached on this host at all


def target_for(settings: Settings, facts: HostFacts) -> Target:
    key = os_key(facts.os, facts.kernel)
    fields = {"driver": settings.driver.version, "os": key, "os_id": facts.os.id,
              "os_version": facts.os.version, "kernel": facts.kernel, "arch": facts.arch}
    ref = Reference(settings.image.registry, settings.image.repository,
                    tag=render_tag(settings.image.tag_template, fields))
    tree = PurePosixPath(settings.install.root) / settings.driver.version / key
    return Target(settings.driver.version, key, facts.kernel, ref, str(tree), str(tree / "lib64"))


def plan(settings: Settings, facts: HostFacts, installed: Installed, state: State) -> Plan:
    """The actions, in order. Pure: the same inputs always give the same plan."""
    target = target_for(settings, facts)
    changed = state.last_kernel if state.last_kernel and state.last_kernel != facts.kernel else None
    # Ordering first: it must be in place for the next boot even if this install fails.
    units = (WriteUnits(settings.units.before),)
    if not facts.gpus:
        return Plan(target, units, no_gpu=True, kernel_changed_from=changed)
    if settings.modules.load and not facts.modules_supported:
        return Plan(target, units, no_gpu=False, kernel_changed_from=changed,
                    blocked="this kernel cannot load modules (no /proc/modules); set modules.load = false "
                            "if another tool loads the driver")

    actions: list[Action] = list(units)
    fresh = installed.marker is None or (installed.marker.driver, installed.marker.os_key) != (
        target.driver, target.os_key)
    if fresh:
        actions.append(InstallImage(target))
    if settings.modules.load:
        # Load before switching: if the new driver does not load, `current` and the overlay stay
        # on the previous one, and its modules are put back.
        fallback = installed.current if installed.current not in (None, target.tree) else None
        actions.append(LoadModules(target.tree, dict(settings.modules.parameters), fallback))
    if fresh or installed.current != target.tree:
        actions.append(SwitchCurrent(target.tree))
    if settings.mount.enabled:
        state_now = classify(facts.mount_at(settings.mount.target), target.lib64)
        # A reinstall exchanges the tree under a live mount: remount so it shows the new files.
        if state_now is MountState.STALE or (state_now is MountState.OURS and fresh):
            actions.append(Unmount(settings.mount.target, "shows another tree" if state_now is MountState.STALE
                                   else "tree was reinstalled"))
        if state_now is not MountState.OURS or fresh:
            actions.append(MountOverlay(target.lib64, settings.mount.target))
            if settings.mount.ldconfig:
                actions.append(Ldconfig())
    if settings.modules.load:
        actions += [CreateDeviceNodes(tuple(g.pci_slot for g in facts.gpus)), StartPersistenced(target.tree)]
    return Plan(target, tuple(actions), no_gpu=False, kernel_changed_from=changed)
