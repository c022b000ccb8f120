"""The pipeline: detect → decide → fetch → install → mount → load, reported at every phase."""

from __future__ import annotations

import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog

from agent import __version__, failpoints
from agent import mount as mounts
from agent.bus import Systemd
from agent.cancel import Cancel, next_delay_s
from agent.config import Settings
from agent.devices import (
    Monitor,
    ensure_nodes,
    gpu_minor,
    missing_nodes,
    ownership,
    plan_nodes,
    wait_gpus_bound,
)
from agent.errors import AgentError, Cancelled, HostError, ImageMissing, RegistryUnavailable, cause_chain
from agent.fetch.manifest import Platform, ResolvedImage
from agent.fetch.store import BlobStore, CachePolicy
from agent.fleet.metrics import Metrics
from agent.fleet.publish import Publisher
from agent.hostfacts import HostFacts, HostProbe, read_modules, visible_mount
from agent.hostroot import HostRoot
from agent.install.trees import current_target, installed_trees, prune_trees, remove_debris, switch_current
from agent.log import RepeatLimiter
from agent.modules import ModulesRefused, load_modules
from agent.persistenced import PID_FILE as PERSISTENCED_PID_FILE
from agent.persistenced import ensure_persistenced, running, stop_persistenced
from agent.plan import (
    Action,
    CreateDeviceNodes,
    Installed,
    InstallImage,
    Ldconfig,
    LinkTools,
    LoadModules,
    MountOverlay,
    Plan,
    StartPersistenced,
    SwitchCurrent,
    Target,
    Unmount,
    WriteUnits,
    parameters_key,
    plan,
    plan_serving,
    rollback_candidate,
    target_for,
    target_for_boot,
)
from agent.state import (
    IMAGES_DIR,
    NEXT_KERNEL_FILE,
    STATE_FILE,
    Pin,
    Refusal,
    State,
    load_state,
    read_marker,
    read_next_kernel,
    save_state,
    write_next_kernel,
)

if TYPE_CHECKING:  # the fetch and install stack is imported on first use: an unchanged boot never needs it
    from agent.fetch.engine import EngineSource
    from agent.fetch.imported import ImageStore
    from agent.fetch.registry import RegistryClient
    from agent.fetch.sources import Sources, Trust
from agent.status import LastError, Phase, Snapshot
from agent.tools import apply_links, bin_dir_for, plan_links, read_links, tools_in
from agent.units import UNIT_DIR, apply_dropins
from agent.update import NextBoot
from agent.update import next_boot as next_boot_of
from agent.update.watch import POLLED_SOURCES, NextBootProbe, source_for

CACHE_DIR = "/var/cache/nvidia-agent"
GPU_BIND_TIMEOUT_S = 30.0
ERROR_LOG_PERIOD_S = 3600.0
NVIDIA_PROC = "/proc/driver/nvidia"
MODULE_DIRS = ("/lib/modules", "/usr/lib/modules")  # where a kernel package puts its modules

Notify = Callable[[str], None]


# Steps every pass goes through that change nothing on a settled host (loading is a no-op when
# the modules are loaded at the right version): not shown while re-checking one.
QUIET_PHASES = (Phase.DETECTING, Phase.UNITS, Phase.LOADING)


class Refused(AgentError):
    """The target's modules were refused by this kernel before, and nothing has changed since."""


class Agent:
    """Owns the snapshot and runs reconciles; every collaborator is injected."""

    def __init__(self, host: HostRoot, settings: Settings, *, probe: HostProbe,
                 registry: RegistryClient | Callable[[], RegistryClient],
                 notify: Notify = lambda _status: None, platform: Platform | None = None,
                 udev_monitor: Callable[[], Monitor] | None = None, systemd: Systemd | None = None,
                 next_boot: NextBootProbe | None = None, engine: EngineSource | None = None,
                 trust: Trust | None = None) -> None:
        self.host = host
        self.settings = settings
        self.probe = probe
        self._registry = registry  # or what makes one: TLS trust and requests cost ~50 ms an unchanged boot saves
        self._engine_given = engine
        self._trust = trust
        self._fetch_lock = threading.Lock()
        self._fetch: _Fetch | None = None
        self._containers: EngineSource | None = None  # before the fetch stack is built
        self.notify = notify
        self.platform = platform or Platform.host()
        self.udev_monitor = udev_monitor  # a started pyudev monitor of kernel PCI events, or None
        self.systemd = systemd or Systemd()
        self.next_boot = next_boot or NextBootProbe(host)
        self.watches_updates = False  # an updater is asked about the next boot (the daemon polls it)
        self.update_source = "none"  # who says what the next boot runs here (source_for), once a pass looked
        self.next_boot_looked = False  # a pass has asked it since the agent started (the gate waits for that)
        self._rollback: Pin | Literal["undo"] | None = None  # from `nvidia-agent rollback` (likewise)
        self._request_lock = threading.Lock()
        self._stage_errors = RepeatLimiter(ERROR_LOG_PERIOD_S)
        self._stage_retry: tuple[str, int, float] = ("", 0, 0.0)  # (next os key, failures, monotonic not before)
        self._next_said: tuple[str, str | None] | None = None  # the next boot's last logged (state, os key)
        self.store = BlobStore(host(CACHE_DIR) / "blobs", CachePolicy(settings.install.cache_max_mib << 20,
                                                                      settings.install.cache_max_age_s))
        self.snapshot = Snapshot(version=__version__, driver=settings.driver.version)
        self.metrics = Metrics()
        export = settings.export
        self.fleet = Publisher(host, textfile_dir=export.textfile_dir, nfd_dir=export.nfd_dir, cdi_dir=export.cdi_dir,
                               operator_dir=export.operator_dir, library_dir=settings.mount.target,
                               metrics=self.metrics)
        self._events: deque[dict[str, Any]] = deque(maxlen=export.events)
        self._clock: _InstallClock | None = None  # this boot's install in flight, for `progress`
        self.snapshot = self.snapshot.evolve(last_ready_at=load_state(host(STATE_FILE)).last_ready_at)
        self.log = structlog.get_logger("nvidia-agent")
        self._errors = RepeatLimiter(ERROR_LOG_PERIOD_S)
        self._link_errors = RepeatLimiter(ERROR_LOG_PERIOD_S)
        self._last_outcome: tuple[Phase, str] | None = None
        self._kernel_change_seen: tuple[str, str] | None = None  # logged once, not on every retry
        self._overlay: tuple[str, str] | None = None  # (lower, library dir) the last check found shown
        self._rechecking = False  # this pass re-checks a settled host: the steps that change nothing stay quiet

    # --- where images come from: built on first use, from any thread

    @property
    def sources(self) -> Sources:
        return self._fetched().sources

    @property
    def imported(self) -> ImageStore:
        return self._fetched().imported

    @property
    def engine(self) -> EngineSource | None:
        return self._fetched().engine

    @property
    def containers(self) -> EngineSource:
        """Who names a container by its ID: the engine, even where it is no image source (built apart from the
        registry client: naming containers needs no TLS trust)."""
        with self._fetch_lock:
            if self._fetch is not None:
                return self._fetch.containers
            if self._containers is None:
                self._containers = self._engine_given or _Fetch.namer(self)
            return self._containers

    def _container_names(self, ids: Iterable[str]) -> dict[str, str]:
        """Best effort: a busy module's error names the containers it can, never fails for the names."""
        try:
            return self.containers.container_names(ids)
        except Exception as exc:
            self.log.debug("container_names_unknown", error=f"{type(exc).__name__}: {exc}")
            return {}

    def _fetched(self) -> _Fetch:
        with self._fetch_lock:
            if self._fetch is None:
                self._fetch = _Fetch.build(self)
            return self._fetch

    # --- reporting: one place that updates the log, the snapshot and systemd's STATUS=

    def _phase(self, phase: Phase, detail: str = "", *, level: str = "info", **ctx: Any) -> None:
        """One phase change: the snapshot, systemd's STATUS= and one log event.

        A periodic re-check of a settled host (detecting, then the same outcome again) logs at
        debug, so the journal holds changes, not a heartbeat.
        """
        settled = phase in (Phase.READY, Phase.NO_GPU)
        if self._rechecking and phase in QUIET_PHASES:
            # A re-check of a ready host (every update.poll_s where an updater is asked) goes
            # through detecting, units and loading with nothing to do: `status`, STATUS= and the
            # gate keep seeing the settled phase. A step that changes something is shown.
            self.log.debug(phase.value, **({"detail": detail} if detail else {}), **ctx)
            return
        self._rechecking = False
        if phase is Phase.DETECTING or (settled and self._last_outcome == (phase, detail)):
            level = "debug"
        if settled:
            self._last_outcome = (phase, detail)
        changed = phase != self.snapshot.phase
        if changed:
            self._event(phase=phase.value, detail=detail or None)
        self.snapshot = self.snapshot.evolve(phase=phase, detail=detail)
        if changed:
            self.fleet.publish(self.snapshot, settled=False)  # the metrics follow the phase
        getattr(self.log, level)(phase.value, **({"detail": detail} if detail else {}), **ctx)
        self.notify(f"{phase.value}: {detail}" if detail else phase.value)

    def progress(self) -> dict[str, Any] | None:
        """How far this boot's download is (status, STATUS=), while the agent is pulling; else None."""
        clock = self._clock
        if clock is None or self.snapshot.phase is not Phase.PULLING:
            return None
        return clock.progress()

    def _event(self, **what: Any) -> None:
        """One entry of `status --events`: a phase change (with how long the phase before it lasted) or an error."""
        if not self._events.maxlen:
            return
        now = time.time()
        self._events.append({"at": now, "after_s": round(now - self.snapshot.phase_since, 3),
                             **{k: v for k, v in what.items() if v is not None}})
        self.snapshot = self.snapshot.evolve(events=tuple(self._events))

    def reconcile(self, cancel: Cancel | None = None) -> Phase:
        """One pass. Never raises for host or image trouble: the outcome is the returned phase."""
        cancel = cancel or Cancel()
        started = time.monotonic()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(driver=self.settings.driver.version)
        self._rechecking = self.snapshot.phase in (Phase.READY, Phase.NO_GPU)
        error_kind: str | None = None
        interrupted = False
        try:
            outcome = self._reconcile(cancel)
        except Cancelled as exc:  # stopping: nothing failed, nothing half-done (staging is removed)
            self.log.info("interrupted", reason=exc.message)
            outcome = self.snapshot.phase
            interrupted = True
        except AgentError as exc:
            error_kind = type(exc).__name__
            outcome = self._failed(exc, transient_default=exc.transient)
        except Exception as exc:  # a bug: report it with its traceback, keep the daemon alive, retry later
            self.log.exception("reconcile_crashed", error=f"{type(exc).__name__}: {exc}")
            self.snapshot = self.snapshot.evolve(serving=None)  # a crash leaves what runs unknown
            error_kind = "Crash"
            outcome = self._failed(exc, transient_default=False)
        now = time.time()
        self.snapshot = self.snapshot.evolve(last_reconcile_at=now)
        if not interrupted:  # a cut-off pass says nothing about whether the driver works
            self._export(outcome, error_kind, now)
        self.log.debug("reconcile_done", phase=outcome.value, duration_s=round(time.monotonic() - started, 3))
        return outcome

    def _export(self, outcome: Phase, error_kind: str | None, now: float) -> None:
        """What the fleet reads, from this pass's outcome (never a reason for a pass to fail)."""
        try:
            marker = read_marker(self.host(self.snapshot.current)) if self.snapshot.current else None
            self.snapshot = self.snapshot.evolve(active_driver=marker.driver if marker else None)
            if outcome in (Phase.READY, Phase.NO_GPU):
                self.snapshot = self.snapshot.evolve(last_ready_at=now)
            self.metrics.passed(outcome, error_kind, now)
            self.fleet.publish(self.snapshot, settled=True)
        except Exception as exc:  # a bug of ours: logged, and the agent goes on
            self.log.exception("export_failed", error=f"{type(exc).__name__}: {exc}")

    def overlay_shown(self) -> bool:
        """Whether the library directory still shows the overlay the last pass checked (cheap: one
        read of mountinfo). True when there is none to show (mounting disabled, nothing READY yet)."""
        if self._overlay is None:
            return True
        lower, lib_dir = self._overlay
        try:
            seen = visible_mount(self.probe.mounts(), lib_dir)
        except Exception:  # the main thread asks: whatever fails, a pass looks and reports it
            return False
        top = seen if seen is not None and seen.mount_point == lib_dir else None
        return mounts.classify(top, lower) is mounts.MountState.OURS

    def forget_refusal(self) -> None:
        """The operator asked (systemctl reload): try a tree the kernel refused once more."""
        path = self.host(STATE_FILE)
        state = load_state(path)
        if state.refused is not None:
            self.log.info("refusal_forgotten", tree=state.refused.tree, digest=state.refused.digest)
            save_state(path, replace(state, refused=None))

    def _reconcile(self, cancel: Cancel) -> Phase:
        self._phase(Phase.DETECTING)
        install_root = self.host(self.settings.install.root)
        remove_debris(install_root, self._debris)
        facts = self.probe.facts(self.settings.mount.target)
        structlog.contextvars.bind_contextvars(kernel=facts.kernel, os=f"{facts.os.id}-{facts.os.version}")
        state = self._take_rollback(load_state(self.host(STATE_FILE)))
        configured, target, installed = self._targets(facts, state)
        the_plan = plan(self.settings, facts, installed, state)
        self.snapshot = self.snapshot.evolve(
            os=facts.os.pretty_name, kernel=facts.kernel,
            kernel_changed_from=the_plan.kernel_changed_from or state.previous_kernel,
            gpus=tuple(f"{g.pci_slot} {g.device_id:04x} ({g.kind})" for g in facts.gpus),
            os_key=target.os_key, install_path=target.tree, image=str(target.reference),
            current=installed.current, next_attempt_at=None)
        if the_plan.kernel_changed_from and self._kernel_change_seen != (the_plan.kernel_changed_from, facts.kernel):
            self._kernel_change_seen = (the_plan.kernel_changed_from, facts.kernel)
            self.log.info("kernel_changed", previous=the_plan.kernel_changed_from, tree=target.tree)
        if facts.passthrough:
            self.log.debug("gpus_passed_through", gpus=",".join(g.pci_slot for g in facts.passthrough))
        if installed.marker is not None:
            self.snapshot = self.snapshot.evolve(image=installed.marker.reference, digest=installed.marker.digest)
        if not any(isinstance(a, InstallImage) for a in the_plan.actions):
            # nothing pulled now: complete blobs are a crash's leftovers, unless the next boot's pull
            # was cut off (its finished layers are what it resumes from)
            self.store.collect(keep=(), idle=not self.next_boot_pending())
        try:
            self._run(the_plan.actions, facts, cancel, target)
            if the_plan.no_gpu:
                self.snapshot = self.snapshot.evolve(serving=None)
                self._phase(Phase.NO_GPU, "no NVIDIA GPU (PCI vendor 0x10de, class 0x0300/0x0302) on this host")
                return Phase.NO_GPU
            if the_plan.blocked:
                raise HostError(the_plan.blocked)
            self._check_result(target.tree, facts)
        except Cancelled:
            raise
        except AgentError as exc:
            self._remember_refusal(exc, the_plan, facts, state)
            if the_plan.fallback is not None:
                self._serve(the_plan.fallback, target.tree, cancel, exc)
            else:
                self.snapshot = self.snapshot.evolve(serving=None)
            raise
        # the active tree, the next boot's, and the previous boot's (an OS rollback needs it)
        previous = installed.current if installed.current not in (None, target.tree) else state.previous_tree
        pin = state.pinned.instead_of if state.pinned and target.tree != configured.tree else None
        protected = {self.host(t) for t in (target.tree, state.staged, previous, pin) if t}
        for old in prune_trees(install_root, self.settings.install.keep_trees, protected,
                               configured.driver, self._debris):
            self.log.info("pruned", tree=self.host.host_view(old))
        now = time.time()
        changed = the_plan.kernel_changed_from
        kept = {tree for tree, _ in installed_trees(install_root)}
        working = {k: v for k, v in state.working.items() if self.host(v) in kept} | {facts.kernel: target.tree}
        ready_state = self._save_ready_state(state, State(
            last_kernel=facts.kernel, last_os_key=target.os_key, last_ready_at=now,
            previous_kernel=changed or state.previous_kernel,
            kernel_changed_at=now if changed else state.kernel_changed_at, working=working,
            staged=state.staged if state.staged != target.tree else None, previous_tree=previous,
            pinned=state.pinned if target.tree != configured.tree else None,  # a void pin is dropped
            refused=state.refused if state.refused and state.refused.tree != target.tree else None))
        failpoints.hit("state.written")
        self.snapshot = self.snapshot.evolve(last_error=None, serving=None,
                                             kernel_changed_from=changed or state.previous_kernel,
                                             ready_since=self.snapshot.ready_since or now)
        self._errors.forget()
        self._phase(Phase.READY, f"driver {target.driver} for {target.os_key}", tree=target.tree,
                    digest=self.snapshot.digest)
        self._stage_next_boot(facts, target, ready_state, install_root, cancel)
        return Phase.READY

    def _targets(self, facts: HostFacts, state: State) -> tuple[Target, Target, Installed]:
        """(the configured target, the one this pass heads for: it, or a rollback's pin, what is installed)."""
        configured = target_for(self.settings, facts)
        installed = self._installed(configured, facts)
        target = target_for(self.settings, facts, state, installed)
        if target.tree != configured.tree:
            installed = self._installed(target, facts)
        self.snapshot = self.snapshot.evolve(pinned={"tree": target.tree, "instead_of": configured.tree}
                                             if target.tree != configured.tree else None)
        return configured, target, installed

    def _save_ready_state(self, old: State, new: State) -> State:
        """Every pass of a ready host ends here (every update.poll_s where an updater is asked): the
        state file is rewritten only when something in it changed, or to refresh last_ready_at."""
        same = replace(new, last_ready_at=None) == replace(old, last_ready_at=None)
        fresh = old.last_ready_at is not None and (new.last_ready_at or 0) - old.last_ready_at \
            < self.settings.daemon.check_interval_s
        if same and fresh:
            return old
        save_state(self.host(STATE_FILE), new)
        return new

    # --- stage: the driver for the next boot an OS update staged, installed beside the current one

    def _stage_next_boot(self, facts: HostFacts, running: Target, state: State, install_root: Path,
                         cancel: Cancel) -> None:
        """After READY (kubelet is not kept waiting for this): ask the updater what the next boot
        runs, and install its driver tree without activating it, so that boot needs no network.
        Its outcome is the snapshot's `next_boot`; it never changes this boot's phase."""
        try:
            self._stage(facts, running, state, install_root, cancel)
        except Cancelled:
            raise
        except Exception as exc:  # never let the next boot's trouble touch this boot's READY
            self.log.exception("next_boot_crashed", error=f"{type(exc).__name__}: {exc}")
            self._next(None, self.settings.update.source, "failed", f"{type(exc).__name__}: {exc}", error=str(exc))

    def next_boot_pending(self) -> bool:
        """Whether the next boot's driver may still be missing: the last word on it is not `ready`,
        or nothing was seen where an updater is polled (its poll may lag), or a kernel hook
        announced a kernel the last pass has not staged yet."""
        nxt = self.snapshot.next_boot
        if nxt is not None:
            return nxt.get("state") != "ready" or self._announced_kernel() not in (None, nxt.get("kernel"))
        return self.watches_updates or self._announced_kernel() is not None

    def _announced_kernel(self) -> str | None:
        with self._request_lock:
            return read_next_kernel(self.host(NEXT_KERNEL_FILE))

    def request_rollback(self, *, undo: bool) -> dict[str, Any]:
        """`nvidia-agent rollback [--undo]` (the socket's thread): pick the tree to go back to, or
        say why there is none; the next pass pins and activates it."""
        kernel = self.probe.kernel()
        install_root = self.host(self.settings.install.root)
        state = load_state(self.host(STATE_FILE))
        configured = target_for_boot(self.settings, self.probe.os(), kernel, self.platform.architecture)
        if undo:
            if state.pinned is None:
                return {"ok": False, "error": "nothing is rolled back: the configured driver runs"}
            with self._request_lock:
                self._rollback = "undo"
            return {"ok": True, "tree": configured.tree,
                    "detail": f"back to the configured {configured.tree} (installed again if need be)"}
        current = current_target(install_root)
        trees = tuple((self.host.host_view(t), m) for t, m in installed_trees(install_root))
        found = rollback_candidate(Installed(None, self.host.host_view(current) if current else None, None, trees),
                                   configured, state)
        if found is None:
            kept = ", ".join(t for t, m in trees if m.os_key == configured.os_key) or "none"
            return {"ok": False, "error": f"no earlier driver tree for {configured.os_key} is installed (trees for "
                                          f"it: {kept}; the configured, staged and refused ones do not count): "
                                          "nothing to roll back to"}
        tree, marker = found
        with self._request_lock:
            self._rollback = Pin(tree, configured.tree, kernel, time.time())
        return {"ok": True, "tree": tree, "instead_of": configured.tree, "at": time.time(),
                "detail": f"activating {tree} (driver {marker.driver}, installed "
                          f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(marker.installed_at))} UTC) "
                          f"instead of {configured.tree}, until `nvidia-agent rollback --undo`, a new "
                          "configured driver or another kernel"}

    def _take_rollback(self, state: State) -> State:
        with self._request_lock:
            asked, self._rollback = self._rollback, None
        if asked is None:
            return state
        pinned = None if asked == "undo" else asked
        self.log.info("rollback_undone" if pinned is None else "rollback_pinned",
                      **({"tree": pinned.tree, "instead_of": pinned.instead_of} if pinned else {}))
        state = replace(state, pinned=pinned)
        save_state(self.host(STATE_FILE), state)
        return state

    def request_stage(self, kernel: str) -> dict[str, Any]:
        """`nvidia-agent stage --kernel K` (a kernel package's postinst hook; the socket's thread): the
        next boot runs K. Written down before the answer, so a restart does not lose it; the next
        pass stages it, at once (an earlier failure's backoff does not hold it back)."""
        if kernel == self.probe.kernel():
            return {"ok": False, "error": f"{kernel} is the running kernel: its driver is this boot's"}
        if not self._kernel_installed(kernel):
            return {"ok": False, "error": f"{kernel} is not installed here (no /lib/modules/{kernel})"}
        with self._request_lock:
            write_next_kernel(self.host(NEXT_KERNEL_FILE), kernel)
            self._stage_retry = ("", 0, 0.0)
        return {"ok": True, "kernel": kernel, "at": time.time(),
                "detail": "staging in the background; `nvidia-agent status` shows the next boot"}

    def _kernel_installed(self, kernel: str) -> bool:
        return any(self.host(f"{d}/{kernel}").is_dir() for d in MODULE_DIRS)

    def _postinst_next(self, facts: HostFacts) -> NextBoot | None:
        """The kernel the last postinst hook named, while it is installed and not the running one."""
        with self._request_lock:
            path = self.host(NEXT_KERNEL_FILE)
            kernel = read_next_kernel(path)
            if kernel is not None and (kernel == facts.kernel or not self._kernel_installed(kernel)):
                write_next_kernel(path, None)  # booted, or its package removed again
                kernel = None
        return next_boot_of(facts.os, kernel, "kernel-postinst") if kernel else None

    def finish_staging(self, cancel: Cancel) -> Phase:
        """At shutdown (the daemon's bounded stop): only the next boot's driver, nothing else, and
        at once (a backoff after a missing image does not hold this last try back)."""
        with self._request_lock:
            self._stage_retry = ("", 0, 0.0)
        try:
            facts = self.probe.facts(self.settings.mount.target)
            running = target_for(self.settings, facts)
            self._stage(facts, running, load_state(self.host(STATE_FILE)), self.host(self.settings.install.root),
                        cancel)
        except Cancelled:
            self.log.info("interrupted", reason="the stop's bound for staging ran out")
        except Exception as exc:  # the host is going down: say it, nothing more to do
            self.log.exception("next_boot_crashed", error=f"{type(exc).__name__}: {exc}")
        return self.snapshot.phase

    def _stage(self, facts: HostFacts, running: Target, state: State, install_root: Path, cancel: Cancel) -> None:
        source = source_for(facts.os, self.settings.update.source)
        self.update_source = source
        self.watches_updates = source in POLLED_SOURCES
        if source == "none":
            self.snapshot = self.snapshot.evolve(next_boot=None)
            return
        try:
            told = source == "kernel-postinst"  # told by a hook, not asked of an updater
            nxt = self._postinst_next(facts) if told else self.next_boot.next_boot(facts, source)
        except HostError as exc:
            self._next(None, source, "failed", str(exc), error=str(exc))
            self.next_boot_looked = True
            return
        self.next_boot_looked = True
        if nxt is None:  # nothing staged (any more: an update withdrawn, rolled back): nothing to keep
            self.snapshot = self.snapshot.evolve(next_boot=None)
            if state.staged:
                save_state(self.host(STATE_FILE), replace(state, staged=None))
            return
        t = target_for_boot(self.settings, nxt.os, nxt.kernel, facts.arch)
        marker = read_marker(self.host(t.tree))
        if t.tree == running.tree:  # the update keeps this OS version and kernel: nothing to stage
            self._next(t, source, "ready", f"{t.tree} is the running tree")
            return
        if marker is not None and (marker.driver, marker.os_key, marker.kernel) == (t.driver, t.os_key, t.kernel):
            self._next(t, source, "ready", f"{t.tree} is installed")
            self._remember_staged(state, t.tree)
            return
        with self._request_lock:
            key, failures, not_before = self._stage_retry
        if key != t.os_key:  # another next boot than the one that failed: try at once
            failures, not_before = 0, 0.0
        if time.monotonic() < not_before:
            return  # the last try failed: the snapshot still says why; retried with backoff
        self._next(t, source, "staging", f"{t.reference}")
        clock = _InstallClock(lambda name, ctx: self.log.info(f"staging_{name}", next_os=t.os_key, **ctx), self.store)
        try:
            digest = self._stage_install(t, install_root, clock, _Preempt(cancel, self.overlay_shown))
        except Cancelled:
            if cancel():
                raise
            # the overlay this boot runs on was hidden (a sysext refresh): put it back first; the
            # download resumes from the content store on the next pass, right after
            self._next(t, source, "staging", "interrupted to put the overlay back; resumed next pass")
            return
        except AgentError as exc:
            delay = next_delay_s(failures + 1, self.settings.daemon.retry_initial_s, self.settings.daemon.retry_max_s,
                                 random.random())  # noqa: S311 - jitter, not a secret
            with self._request_lock:
                self._stage_retry = (t.os_key, failures + 1, time.monotonic() + delay)
            missing = isinstance(exc, ImageMissing)
            self._next(t, source, "missing" if missing else "failed",
                       f"{'no image yet: ' if missing else ''}{exc}; next try in {delay:.0f}s", error=str(exc))
            return
        clock.done(self.metrics)
        with self._request_lock:
            self._stage_retry = ("", 0, 0.0)
        self._remember_staged(state, t.tree)
        self._next(t, source, "ready", f"{t.tree} installed ({digest})")

    def _stage_install(self, t: Target, install_root: Path, clock: _InstallClock, preempt: _Preempt) -> str:
        """The next boot's tree installed beside the running one; its image's digest."""
        from agent.install.image import Want, install_image  # noqa: PLC0415 - the change path's own imports

        want = Want(t.driver, t.os_key, t.kernel, self.settings.install.lib64_allow)
        result = install_image(self.sources, t.reference, platform=self.platform, install_root=install_root,
                               tree=self.host(t.tree), want=want, cancelled=preempt, on_phase=clock,
                               on_pull=clock.pulling)
        return result.marker.digest

    def _next(self, t: Target | None, source: str, state: str, detail: str, *, error: str | None = None) -> None:
        """The next boot's status, and one log event when it changed (a failure: once an hour)."""
        self.snapshot = self.snapshot.evolve(next_boot={
            "os_key": t.os_key if t else "?", "kernel": t.kernel if t else "?", "source": source, "state": state,
            "tree": t.tree if t else "", "detail": detail, "at": time.time()})
        next_os = t.os_key if t else None
        if error is not None:
            if self._stage_errors.should_log(f"{state} {next_os}: {error}")[0]:
                self.log.warning("next_boot_" + state, next_os=next_os, error=detail)
            return
        self._stage_errors.forget()
        level = "debug" if self._next_said == (state, next_os) else "info"
        self._next_said = (state, next_os)
        getattr(self.log, level)("next_boot_" + state, next_os=next_os, detail=detail)

    def _remember_staged(self, state: State, tree: str) -> None:
        if state.staged != tree:
            save_state(self.host(STATE_FILE), replace(state, staged=tree))

    def _installed(self, target: Target, facts: HostFacts) -> Installed:
        install_root = self.host(self.settings.install.root)
        current = current_target(install_root)
        trees = tuple((self.host.host_view(tree), marker) for tree, marker in installed_trees(install_root))
        bin_dir = bin_dir_for(self.settings.install.bin_dir, facts.os.id)
        return Installed(read_marker(self.host(target.tree)), self.host.host_view(current) if current else None,
                         read_marker(current) if current else None, trees,
                         current_tools=tools_in(current) if current else None,
                         links=read_links(self.host(self.host.resolve(bin_dir))) if bin_dir else {})

    def _run(self, actions: tuple[Action, ...], facts: HostFacts, cancel: Cancel, target: Target | None) -> None:
        for action in actions:
            cancel.check("stopping: reconcile interrupted")
            self._execute(action, facts, cancel, target)

    def _serve(self, tree: str, target: str, cancel: Cancel, error: AgentError) -> None:
        """The target failed: keep (or make) a tree built for this kernel loaded, mounted and READY."""
        install_root = self.host(self.settings.install.root)
        current = current_target(install_root)
        if current is not None and self.host.host_view(current) == target:
            self.snapshot = self.snapshot.evolve(serving=None)
            return  # the target became current after all: it is what runs, degraded or not
        self.log.warning("serving_previous", tree=tree, because=error.message)
        facts = self.probe.facts(self.settings.mount.target)
        try:
            self._run(plan_serving(self.settings, facts, tree, self.host.host_view(current) if current else None),
                      facts, cancel, None)
            self._check_result(tree, facts)
        except Cancelled:
            raise
        except AgentError as exc:
            self.log.error("serving_previous_failed", tree=tree, error=str(exc))
            self.snapshot = self.snapshot.evolve(serving=None)
            return
        marker = read_marker(self.host(tree))
        self.snapshot = self.snapshot.evolve(serving=tree, current=tree,
                                             digest=marker.digest if marker else self.snapshot.digest)

    def _remember_refusal(self, exc: AgentError, the_plan: Plan, facts: HostFacts, state: State) -> None:
        """A kernel refusal of the target's modules is remembered, so the next tries do not unload the
        working driver again for the same result (until the image, the parameters or the kernel change)."""
        if not isinstance(exc, ModulesRefused):
            return
        marker = read_marker(self.host(the_plan.target.tree))
        if marker is None:
            return
        refusal = Refusal(tree=the_plan.target.tree, digest=marker.digest, kernel=facts.kernel,
                          parameters=parameters_key(self.settings), reason=exc.message, at=time.time())
        save_state(self.host(STATE_FILE), replace(state, refused=refusal))
        self.log.warning("refusal_remembered", tree=refusal.tree, digest=refusal.digest,
                         detail="not retried until the image, the module parameters or the kernel change, "
                                "or: systemctl reload nvidia-agent")

    def _debris(self, path: Path, error: OSError | None) -> None:
        if error is None:
            self.log.info("removed_debris", path=self.host.host_view(path))
        else:
            self.log.warning("debris_not_removed", path=self.host.host_view(path), error=error.strerror or str(error),
                             hint=f"remove it by hand: rm -rf {self.host.host_view(path)}")

    def _execute(self, action: Action, facts: HostFacts, cancel: Cancel, target: Target | None) -> None:
        install_root = self.host(self.settings.install.root)
        match action:
            case InstallImage(target=t, refuse_digest=refuse):
                self._install(t, refuse, cancel, install_root)
            case SwitchCurrent(tree=tree):
                self._phase(Phase.ACTIVATING, f"current -> {tree}")
                self._remember_previous(install_root, tree)
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
                self._load(action, facts, cancel)
            case CreateDeviceNodes(gpu_slots=slots):
                self._nodes(slots)
            case WriteUnits(before=units):
                self._write_units(units)
            case LinkTools(bin_dir=bin_dir):
                self._link_tools(bin_dir)
            case StartPersistenced(tree=tree):
                started = ensure_persistenced(self.host(tree), self.host.root, self.systemd)
                outcome = {"pid": started} if isinstance(started, int) else {"skipped": started}
                self.log.info("persistenced", **outcome)

    def _remember_previous(self, install_root: Path, tree: str) -> None:
        """Before `current` moves, the tree it leaves is written down as the previous boot's: a
        crash between the switch and the end of the pass must not leave it unprotected."""
        old = current_target(install_root)
        previous = self.host.host_view(old) if old is not None else None
        if previous is None or previous == tree:
            return
        state = load_state(self.host(STATE_FILE))
        if state.previous_tree != previous:
            save_state(self.host(STATE_FILE), replace(state, previous_tree=previous))

    def _link_tools(self, bin_dir: str) -> None:
        """Make install.bin_dir show the tools of the tree `current` names (none if there is none)."""
        current = current_target(self.host(self.settings.install.root))
        where = self.host(self.host.resolve(bin_dir))  # /usr/local -> /var/usrlocal (Fedora CoreOS), on the host
        changes = plan_links(self.settings.install.root, tools_in(current) if current else None, read_links(where))
        if changes.foreign:
            self.log.warning("tool_name_taken", bin_dir=bin_dir, tools=",".join(changes.foreign),
                             detail="a file or a link not made by the agent has the name; left alone")
        if not changes:
            return
        try:
            apply_links(where, changes)
        except HostError as exc:  # the driver works without them: never a reason to fail the pass
            if self._link_errors.should_log(exc.message)[0]:
                self.log.warning("tools_not_linked", error=exc.message, hint=exc.hint)
            return
        self.log.info("tools_linked", bin_dir=bin_dir, linked=",".join(t for t, _ in changes.make) or None,
                      removed=",".join(changes.remove) or None)

    def _install(self, t: Target, refuse: str | None, cancel: Cancel, install_root: Path) -> None:
        from agent.install.image import Unchanged, Want, install_image  # noqa: PLC0415 - the change path's own

        want = Want(t.driver, t.os_key, t.kernel, self.settings.install.lib64_allow)
        clock = _InstallClock(lambda name, ctx: self._phase(Phase(name), **ctx), self.store)
        self._clock = clock
        try:
            result = install_image(
                self.sources, t.reference, platform=self.platform, install_root=install_root,
                tree=self.host(t.tree), want=want, cancelled=cancel, refuse_digest=refuse, on_phase=clock,
                on_pull=clock.pulling)
        except Unchanged:
            raise self._refused(t, refuse) from None
        except RegistryUnavailable as exc:
            if refuse is None:
                raise
            raise self._refused(t, refuse) from exc  # whether the image changed cannot be known now
        clock.done(self.metrics)
        self.snapshot = self.snapshot.evolve(image=str(t.reference), digest=result.marker.digest)
        self.log.info("installed", tree=t.tree, digest=result.marker.digest,
                      modules=",".join(m.name for m in result.verified.modules))

    def _refused(self, t: Target, digest: str | None) -> Refused:
        refusal = load_state(self.host(STATE_FILE)).refused
        reason = refusal.reason if refusal else "the kernel refused its modules"
        return Refused(f"driver {t.driver} ({digest}) was refused by kernel {t.kernel}: {reason}",
                       hint="not retried until the image, modules.parameters or the kernel change; "
                            "to try again now: systemctl reload nvidia-agent")

    def _load(self, action: LoadModules, facts: HostFacts, cancel: Cancel) -> None:
        self._phase(Phase.LOADING, f"modules from {action.tree}")
        monitor = self.udev_monitor() if self.udev_monitor else None  # listening before the load
        persisted = running(self.host(PERSISTENCED_PID_FILE), self.host("/proc"))
        try:
            loaded = load_modules(
                self.host(action.tree), self.host.root, action.parameters,
                ours=frozenset({persisted} if persisted else ()),
                before_unload=lambda: stop_persistenced(self.host.root, self.systemd),
                containers=self._container_names)
        except AgentError:
            if action.fallback:
                self._roll_back(action.fallback, action.parameters)
            raise
        self.snapshot = self.snapshot.evolve(modules=loaded)
        self.log.info("modules_loaded", modules=",".join(f"{k}={v}" for k, v in loaded.items()))
        if monitor is not None and self.host("/sys/bus/pci/drivers/nvidia").is_dir():
            slots = tuple(g.pci_slot for g in facts.gpus)
            left = wait_gpus_bound(self.host("/sys/bus/pci/devices"), slots, monitor, GPU_BIND_TIMEOUT_S,
                                   cancelled=cancel)
            if left:
                self.log.warning("gpus_not_bound", gpus=",".join(left), timeout_s=GPU_BIND_TIMEOUT_S)

    def _nodes(self, slots: tuple[str, ...]) -> None:
        """/dev/nvidia*: minors as the driver numbered its GPUs, owner and mode as it was told."""
        self._phase(Phase.LOADING, "device nodes")
        gpus_dir = self.host(f"{NVIDIA_PROC}/gpus")
        if gpus_dir.is_dir():
            read = (_read(gpus_dir / slot / "information") for slot in slots)
            minors = [m for m in (gpu_minor(text) for text in read if text is not None) if m is not None]
        else:  # a driver without /proc/driver/nvidia (the test stand-ins): PCI order
            minors = list(range(len(slots)))
        owner = ownership(_read(self.host(f"{NVIDIA_PROC}/params")),
                          tuple(self.settings.modules.parameters.get("nvidia", ())))
        nodes = plan_nodes(self.host("/proc/devices").read_text(), minors, set(self.snapshot.modules), owner)
        self.snapshot = self.snapshot.evolve(devices=tuple(f"/dev/{n.path}" for n in nodes))
        if not owner.modify:
            missing = missing_nodes(self.host("/dev"), nodes)
            if missing:
                raise HostError(f"device nodes missing: {', '.join('/dev/' + m for m in missing)}",
                                hint="the driver was loaded with NVreg_ModifyDeviceFiles=0, so the agent leaves "
                                     "/dev/nvidia* to whatever was meant to create them")
            return
        changed = ensure_nodes(self.host("/dev"), nodes)
        if changed:
            self.log.info("device_nodes", created=",".join(changed))

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

    def _check_result(self, tree: str, facts: HostFacts) -> None:
        """Ready only if the host now shows what the plan promised for `tree`."""
        install_root = self.host(self.settings.install.root)
        current = current_target(install_root)
        if current is None or self.host.host_view(current) != tree or read_marker(current) is None:
            raise HostError(f"{self.settings.install.root}/current does not point at {tree} after install")
        self.snapshot = self.snapshot.evolve(current=tree)
        if self.settings.mount.enabled:
            lib64 = f"{tree}/lib64"
            top = self.probe.facts(self.settings.mount.target).lib_mount
            if mounts.classify(top, lib64) is not mounts.MountState.OURS:
                raise HostError(f"overlay of {lib64} is not mounted on {facts.lib_dir}")
            self._overlay = (lib64, facts.lib_dir)
            self.snapshot = self.snapshot.evolve(mount=f"{lib64} over {facts.lib_dir}")

    def _failed(self, exc: BaseException, *, transient_default: bool) -> Phase:
        causes = tuple(cause_chain(exc))
        hint = getattr(exc, "hint", None)
        self.snapshot = self.snapshot.evolve(last_error=LastError(
            message=causes[0], hint=hint, causes=causes, transient=transient_default, at=time.time()))
        key = f"{type(exc).__name__}:{causes[0]}"
        log_now, suppressed = self._errors.should_log(key)
        phase = Phase.DEGRADED
        detail = causes[0] if not hint else f"{causes[0]} ({hint})"
        if self.snapshot.serving:
            detail = f"serving {self.snapshot.serving}; {detail}"
        self._event(phase=phase.value, error=causes[0], hint=hint)
        self.snapshot = self.snapshot.evolve(phase=phase, detail=detail)
        self.notify(f"{phase.value}: {detail}")
        self._last_outcome = None  # the next ready is news again
        if log_now:  # one line per failure per period: error, its causes and what to do, as fields
            self.log.error(phase.value, error=causes[0], causes=" <- ".join(causes[1:]) or None, hint=hint,
                           transient=transient_default, repeated=suppressed or None,
                           serving=self.snapshot.serving)
        return phase


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return None


PROGRESS_WINDOW_S = 10.0  # the download rate is measured over this much of the recent past


class _Fetch:
    """Where images come from: the imported store, the engine, mirrors and the origin, in that order."""

    def __init__(self, imported: ImageStore, engine: EngineSource | None, containers: EngineSource,
                 sources: Sources) -> None:
        self.imported, self.engine, self.containers, self.sources = imported, engine, containers, sources

    @classmethod
    def build(cls, agent: Agent) -> _Fetch:
        from agent.fetch.engine import engine_for  # noqa: PLC0415 - see Agent._fetched
        from agent.fetch.imported import ImageStore  # noqa: PLC0415
        from agent.fetch.registry import RegistryClient  # noqa: PLC0415
        from agent.fetch.sources import sources_for  # noqa: PLC0415

        host, image = agent.host, agent.settings.image
        made = agent._registry
        registry = made if isinstance(made, RegistryClient) else made()
        imported = ImageStore(host(IMAGES_DIR))
        engine = agent._engine_given or engine_for(image.source, host(image.engine_socket), agent.store,
                                                   image.timeout_s)
        containers = engine or agent._containers or cls.namer(agent)
        sources = sources_for(registry, agent.store, mirrors=image.mirrors, imported=imported, engine=engine,
                              trust=agent._trust)
        return cls(imported, engine, containers, sources)

    @staticmethod
    def namer(agent: Agent) -> EngineSource:
        """The engine asked only for container names (no pulls)."""
        from agent.fetch.engine import EngineSource  # noqa: PLC0415 - see Agent._fetched

        image = agent.settings.image
        return EngineSource(agent.host(image.engine_socket), agent.store, pull=False, timeout_s=image.timeout_s)


class _InstallClock:
    """Times one install from its phases: resolving → pulling → verifying → done; the source and bytes pulled;
    and, while it downloads into the content store, how far it is (`progress`)."""

    def __init__(self, then: Callable[[str, dict[str, Any]], None], store: BlobStore | None = None) -> None:
        self.then = then
        self.store = store
        self.at: dict[str, float] = {}
        self.bytes = 0
        self.source = "registry"
        self._layers: tuple[tuple[str, int], ...] = ()  # what the content store is filling: (digest, size)
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self._lock = threading.Lock()  # asked by the main thread and the status socket's at once

    def pulling(self, image: ResolvedImage) -> None:
        """The image about to be fetched: what will come over the wire (downloads: what the content store
        lacks; the engine: its export, already read); imports fetch nothing and take no pull time."""
        self.source = image.origin.split(" ")[0]
        downloads = image.origin == "registry" or image.origin.startswith("mirror ")
        store = self.store
        if downloads and store is not None:
            self._layers = tuple((d.digest, d.size) for d in image.layers)
            self.bytes = sum(max(0, d.size - store.present_bytes(d.digest)) for d in image.layers)
        else:
            self.bytes = sum(d.size for d in image.layers) if image.origin == "engine" else 0

    def progress(self) -> dict[str, Any] | None:
        """{done_bytes, total_bytes, percent, rate_bps, eta_s} of the download in flight, or None."""
        layers, store = self._layers, self.store
        if not layers or store is None or "verifying" in self.at:
            return None
        total = sum(size for _, size in layers)
        done = sum(min(size, store.present_bytes(digest)) for digest, size in layers)
        now = time.monotonic()
        with self._lock:
            self._samples.append((now, done))
            while len(self._samples) > 2 and now - self._samples[0][0] > PROGRESS_WINDOW_S:
                self._samples.popleft()
            (t0, d0) = self._samples[0]
        rate = (done - d0) / (now - t0) if now - t0 > 0.5 else None
        eta = round((total - done) / rate, 1) if rate else None
        return {"done_bytes": done, "total_bytes": total, "percent": round(100 * done / total, 1) if total else 100.0,
                "rate_bps": round(rate) if rate is not None else None, "eta_s": eta}

    def __call__(self, name: str, ctx: dict[str, Any]) -> None:
        self.at.setdefault(name, time.monotonic())
        self.then(name, ctx)

    def done(self, metrics: Metrics) -> None:
        now = time.monotonic()
        pulling, verifying = self.at.get("pulling"), self.at.get("verifying")
        pull_s = (verifying or now) - pulling if pulling is not None and self.source != "imported" else None
        metrics.installed(self.source, pull_s, now - self.at.get("resolving", now), self.bytes)


class _Preempt:
    """Staging's cancel check: a stop, or this boot's overlay hidden (checked at most once a second:
    staging is a long download, and a hidden overlay is what the running workloads need back first)."""

    def __init__(self, cancel: Cancel, overlay_shown: Callable[[], bool]) -> None:
        self.cancel, self.overlay_shown = cancel, overlay_shown
        self._checked = time.monotonic()
        self._hidden = False

    def __call__(self) -> bool:
        if self.cancel() or self._hidden:
            return True
        now = time.monotonic()
        if now - self._checked < 1.0:
            return False
        self._checked = now
        self._hidden = not self.overlay_shown()  # latched: every thread of the staging sees it from now on
        return self._hidden
