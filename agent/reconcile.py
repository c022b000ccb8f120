"""The pipeline: detect → decide → fetch → install → mount → load, reported at every phase."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import structlog

from agent import __version__
from agent import mount as mounts
from agent.bus import Systemd
from agent.config import Settings
from agent.devices import Monitor, ensure_nodes, plan_nodes, wait_gpus_bound
from agent.errors import AgentError, Cancelled, HostError, cause_chain
from agent.hostfacts import HostFacts, HostProbe, read_modules, top_mount
from agent.hostroot import HostRoot
from agent.install import current_target, install_image, prune_trees, remove_debris, switch_current
from agent.log import RepeatLimiter
from agent.modules import load_modules
from agent.persistenced import PID_FILE as PERSISTENCED_PID_FILE
from agent.persistenced import ensure_persistenced, running, stop_persistenced
from agent.plan import (
    Action,
    CreateDeviceNodes,
    Installed,
    InstallImage,
    Ldconfig,
    LoadModules,
    MountOverlay,
    Plan,
    StartPersistenced,
    SwitchCurrent,
    Unmount,
    WriteUnits,
    plan,
    target_for,
)
from agent.registry import Platform, RegistryClient
from agent.state import STATE_FILE, State, load_state, read_marker, save_state
from agent.status import LastError, Phase, Snapshot
from agent.units import UNIT_DIR, apply_dropins

CACHE_DIR = "/var/cache/nvidia-agent"
GPU_BIND_TIMEOUT_S = 30.0
ERROR_LOG_PERIOD_S = 3600.0

Notify = Callable[[str], None]


class Agent:
    """Owns the snapshot and runs reconciles; every collaborator is injected."""

    def __init__(self, host: HostRoot, settings: Settings, *, probe: HostProbe, registry: RegistryClient,
                 notify: Notify = lambda _status: None, platform: Platform | None = None,
                 udev_monitor: Callable[[], Monitor] | None = None, systemd: Systemd | None = None) -> None:
        self.host = host
        self.settings = settings
        self.probe = probe
        self.registry = registry
        self.notify = notify
        self.platform = platform or Platform.host()
        self.udev_monitor = udev_monitor  # a started pyudev monitor of kernel PCI events, or None
        self.systemd = systemd or Systemd()
        self.snapshot = Snapshot(version=__version__, driver=settings.driver.version)
        self.log = structlog.get_logger("nvidia-agent")
        self._errors = RepeatLimiter(ERROR_LOG_PERIOD_S)
        self._last_outcome: tuple[Phase, str] | None = None

    # --- reporting: one place that updates the log, the snapshot and systemd's STATUS=

    def _phase(self, phase: Phase, detail: str = "", *, level: str = "info", **ctx: Any) -> None:
        """One phase change: the snapshot, systemd's STATUS= and one log event.

        A periodic re-check of a settled host (detecting, then the same outcome again) logs at
        debug, so the journal holds changes, not a heartbeat.
        """
        settled = phase in (Phase.READY, Phase.NO_GPU)
        if phase is Phase.DETECTING or (settled and self._last_outcome == (phase, detail)):
            level = "debug"
        if settled:
            self._last_outcome = (phase, detail)
        self.snapshot = self.snapshot.evolve(phase=phase, detail=detail)
        getattr(self.log, level)(phase.value, **({"detail": detail} if detail else {}), **ctx)
        self.notify(f"{phase.value}: {detail}" if detail else phase.value)

    def reconcile(self, cancelled: Callable[[], bool] = lambda: False) -> Phase:
        """One pass. Never raises for host or image trouble: the outcome is the returned phase."""
        started = time.monotonic()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(driver=self.settings.driver.version)
        try:
            outcome = self._reconcile(cancelled)
        except Cancelled as exc:  # stopping: nothing failed, nothing half-done (staging is removed)
            self.log.info("interrupted", reason=exc.message)
            outcome = Phase.DEGRADED
        except AgentError as exc:
            outcome = self._failed(exc, transient_default=exc.transient)
        except Exception as exc:  # a bug: report it, keep the daemon alive, retry later
            self.log.exception("reconcile_crashed")
            outcome = self._failed(exc, transient_default=False)
        self.snapshot = self.snapshot.evolve(last_reconcile_at=time.time())
        self.log.debug("reconcile_done", phase=outcome.value, duration_s=round(time.monotonic() - started, 3))
        return outcome

    def _reconcile(self, cancelled: Callable[[], bool]) -> Phase:
        self._phase(Phase.DETECTING)
        facts = self.probe.facts()
        structlog.contextvars.bind_contextvars(kernel=facts.kernel, os=f"{facts.os.id}-{facts.os.version}")
        state_path = self.host(STATE_FILE)
        state = load_state(state_path)
        install_root = self.host(self.settings.install.root)
        target = target_for(self.settings, facts)
        current = current_target(install_root)
        installed = Installed(read_marker(self.host(target.tree)),
                              self.host.host_view(current) if current else None)
        the_plan = plan(self.settings, facts, installed, state)
        self.snapshot = self.snapshot.evolve(
            os=facts.os.pretty_name, kernel=facts.kernel,
            kernel_changed_from=the_plan.kernel_changed_from or state.previous_kernel,
            gpus=tuple(f"{g.pci_slot} {g.device_id:04x} ({g.kind})" for g in facts.gpus),
            os_key=target.os_key, install_path=target.tree, image=str(target.reference),
            current=installed.current, next_attempt_at=None)
        if the_plan.kernel_changed_from:
            self.log.info("kernel_changed", previous=the_plan.kernel_changed_from, tree=target.tree)
        if installed.marker is not None:
            self.snapshot = self.snapshot.evolve(image=installed.marker.reference, digest=installed.marker.digest)
        for action in the_plan.actions:
            if cancelled():
                raise Cancelled("stopping: reconcile interrupted")
            self._execute(action, facts, cancelled)
        if the_plan.no_gpu:
            self._phase(Phase.NO_GPU, "no NVIDIA GPU (PCI vendor 0x10de, class 0x0300/0x0302) on this host")
            return Phase.NO_GPU
        if the_plan.blocked:
            raise HostError(the_plan.blocked)
        self._check_result(the_plan)
        for old in prune_trees(install_root, self.settings.install.keep_trees, {self.host(target.tree)}, target.driver):
            self.log.info("pruned", tree=self.host.host_view(old))
        now = time.time()
        changed = the_plan.kernel_changed_from
        save_state(state_path, State(
            last_kernel=facts.kernel, last_os_key=target.os_key, last_ready_at=now,
            previous_kernel=changed or state.previous_kernel,
            kernel_changed_at=now if changed else state.kernel_changed_at))
        self.snapshot = self.snapshot.evolve(last_error=None, kernel_changed_from=changed or state.previous_kernel,
                                             ready_since=self.snapshot.ready_since or now)
        self._errors.forget()
        self._phase(Phase.READY, f"driver {target.driver} for {target.os_key}", tree=target.tree,
                    digest=self.snapshot.digest)
        return Phase.READY

    def _execute(self, action: Action, facts: HostFacts, cancelled: Callable[[], bool]) -> None:
        install_root = self.host(self.settings.install.root)
        match action:
            case InstallImage(target=t):
                for debris in remove_debris(install_root):
                    self.log.info("removed_debris", path=self.host.host_view(debris))
                result = install_image(
                    self.registry, t.reference, platform=self.platform, install_root=install_root,
                    tree=self.host(t.tree), blob_cache=self.host(CACHE_DIR) / "blobs",
                    driver=t.driver, os_key=t.os_key, kernel=t.kernel, cancelled=cancelled,
                    on_phase=lambda name, ctx: self._phase(Phase(name), **ctx))
                self.snapshot = self.snapshot.evolve(image=str(t.reference), digest=result.marker.digest)
                self.log.info("installed", tree=t.tree, digest=result.marker.digest,
                              modules=",".join(m.name for m in result.verified.modules))
            case SwitchCurrent(tree=tree):
                self._phase(Phase.ACTIVATING, f"current -> {tree}")
                switch_current(install_root, self.host(tree))
                self.snapshot = self.snapshot.evolve(current=tree)
            case Unmount(path=path, reason=reason):
                self._phase(Phase.MOUNTING, f"unmount {path}: {reason}")
                mounts.unmount(self.host(path))
            case MountOverlay(lower=lower, path=path):
                self._phase(Phase.MOUNTING, f"overlay {lower} on {path}")
                mounts.mount_overlay(self.host(lower), self.host(path))
            case Ldconfig():
                mounts.ldconfig(self.host.root)
            case LoadModules():
                self._load(action, facts)
            case CreateDeviceNodes(gpu_slots=slots):
                self._phase(Phase.LOADING, "device nodes")
                nodes = plan_nodes(self.host("/proc/devices").read_text(), len(slots), set(self.snapshot.modules))
                changed = ensure_nodes(self.host("/dev"), nodes)
                self.snapshot = self.snapshot.evolve(devices=tuple(f"/dev/{n.path}" for n in nodes))
                if changed:
                    self.log.info("device_nodes", created=",".join(changed))
            case WriteUnits(before=units):
                self._write_units(units)
            case StartPersistenced(tree=tree):
                started = ensure_persistenced(self.host(tree), self.host.root, self.systemd)
                outcome = {"pid": started} if isinstance(started, int) else {"skipped": started}
                self.log.info("persistenced", **outcome)

    def _load(self, action: LoadModules, facts: HostFacts) -> None:
        self._phase(Phase.LOADING, f"modules from {action.tree}")
        monitor = self.udev_monitor() if self.udev_monitor else None  # listening before the load
        persisted = running(self.host(PERSISTENCED_PID_FILE), self.host("/proc"))
        try:
            loaded = load_modules(
                self.host(action.tree), self.host.root, action.parameters,
                ours=frozenset({persisted} if persisted else ()),
                before_unload=lambda: stop_persistenced(self.host.root, self.systemd))
        except AgentError:
            if action.fallback:
                self._roll_back(action.fallback, action.parameters)
            raise
        self.snapshot = self.snapshot.evolve(modules=loaded)
        self.log.info("modules_loaded", modules=",".join(f"{k}={v}" for k, v in loaded.items()))
        if monitor is not None and self.host("/sys/bus/pci/drivers/nvidia").is_dir():
            slots = tuple(g.pci_slot for g in facts.gpus)
            left = wait_gpus_bound(self.host("/sys/bus/pci/devices"), slots, monitor, GPU_BIND_TIMEOUT_S)
            if left:
                self.log.warning("gpus_not_bound", gpus=",".join(left), timeout_s=GPU_BIND_TIMEOUT_S)

    def _write_units(self, units: tuple[str, ...]) -> None:
        changes = apply_dropins(self.host(UNIT_DIR), units)
        if not (changes.write or changes.remove):
            return
        self._phase(Phase.UNITS, f"ordering before {', '.join(units) or 'no units'}",
                    written=",".join(changes.write) or None, removed=",".join(changes.remove) or None)
        try:
            self.systemd.reload()
        except HostError as exc:
            self.log.warning("units_not_reloaded", error=str(exc),
                             hint="run systemctl daemon-reload; the drop-ins apply from the next boot")

    def _roll_back(self, tree: str, params: dict[str, tuple[str, ...]]) -> None:
        """Put the previous tree's modules (and persistenced) back after the new ones failed to load."""
        before = read_modules(self.host("/sys/module"))
        try:
            loaded = load_modules(self.host(tree), self.host.root, params)
            ensure_persistenced(self.host(tree), self.host.root, self.systemd)
        except AgentError as exc:
            self.log.error("rollback_failed", tree=tree, error=str(exc))
            return
        self.snapshot = self.snapshot.evolve(modules=loaded)
        if any(before.get(name) != version for name, version in loaded.items()):  # nothing unloaded: no rollback
            self.log.warning("rolled_back", tree=tree, modules=",".join(f"{k}={v}" for k, v in loaded.items()))

    def _check_result(self, the_plan: Plan) -> None:
        """Ready only if the host now shows what the plan promised."""
        t = the_plan.target
        install_root = self.host(self.settings.install.root)
        current = current_target(install_root)
        if current is None or self.host.host_view(current) != t.tree or read_marker(current) is None:
            raise HostError(f"{self.settings.install.root}/current does not point at {t.tree} after install")
        self.snapshot = self.snapshot.evolve(current=t.tree)
        if self.settings.mount.enabled:
            top = top_mount(self.probe.mounts(), self.settings.mount.target)
            if mounts.classify(top, t.lib64) is not mounts.MountState.OURS:
                raise HostError(f"overlay of {t.lib64} is not mounted on {self.settings.mount.target}")
            self.snapshot = self.snapshot.evolve(mount=f"{t.lib64} over {self.settings.mount.target}")

    def _failed(self, exc: BaseException, *, transient_default: bool) -> Phase:
        causes = tuple(cause_chain(exc))
        hint = getattr(exc, "hint", None)
        self.snapshot = self.snapshot.evolve(last_error=LastError(
            message=causes[0], hint=hint, causes=causes, transient=transient_default, at=time.time()))
        key = f"{type(exc).__name__}:{causes[0]}"
        log_now, suppressed = self._errors.should_log(key)
        phase = Phase.DEGRADED
        detail = causes[0] if not hint else f"{causes[0]} ({hint})"
        self.snapshot = self.snapshot.evolve(phase=phase, detail=detail)
        self.notify(f"{phase.value}: {detail}")
        self._last_outcome = None  # the next ready is news again
        if log_now:  # one line per failure per period: error, its causes and what to do, as fields
            self.log.error(phase.value, error=causes[0], causes=" <- ".join(causes[1:]) or None, hint=hint,
                           transient=transient_default, repeated=suppressed or None)
        return phase

