"""The daemon: one lock, the status socket, reconcile at start and on triggers, back off on failure."""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import IO, TYPE_CHECKING, Any

import structlog

from agent.cancel import Cancel, next_delay_s
from agent.errors import AgentError, ExitCode, HostError
from agent.log import RepeatLimiter
from agent.notify import Notifier
from agent.reconcile import Agent
from agent.status import Phase, Snapshot, StatusServer, render_progress
from agent.update import KERNEL_RELEASE_RE
from agent.update.signals import StatusSignals
from agent.update.watch import source_for

if TYPE_CHECKING:  # the metrics server and the reboot gate are imported only where configured (requests, prometheus)
    from agent.fleet.serve import MetricsServer
    from agent.update.gate import RebootGate

LOCK_FILE = "/run/nvidia-agent/agent.lock"
# Fault injection for the watchdog test: after READY, the main loop stops for this long without pinging.
WEDGE_ENV = "NVIDIA_AGENT_TEST_WEDGE_S"
LOOP_TICK_S = 5.0  # the main loop looks at the worker at least this often
PROGRESS_STATUS_S = 2.0  # while pulling, STATUS= shows the percentage this often
EXTEND_S = 60.0  # EXTEND_TIMEOUT_USEC while starting; refreshed every EXTEND_S / 3
STOP_GRACE_S = 5.0  # a stop waits this long for the pass to reach a checkpoint, then exits anyway
STALL_LIMIT_S = 600.0  # a pass silent this long is hung (every wait in it is bounded far below)
MOUNTS_SETTLE_S = 1.0  # after a mount change, the overlay is looked at this much later (a sysext refresh is two)
MOUNTINFO = "/proc/self/mountinfo"
ERROR_LOG_PERIOD_S = 3600.0
SIGNAL_MIN_GAP_S = 5.0  # update_engine's signal brings a pass at most this often


class LockHeld(AgentError):
    """Another nvidia-agent daemon runs on this host root."""


def acquire_lock(path: Path) -> IO[str]:
    """An exclusive flock held for the process's life; the file names the holder's PID."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise LockHeld(f"another nvidia-agent (pid {holder}) holds {path}",
                       hint="stop it first (systemctl stop nvidia-agent)") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def process_age_s(proc: Path = Path("/proc")) -> float:
    """Seconds since this process started (/proc/self/stat starttime against /proc/uptime); 0 if unknown."""
    try:
        fields = (proc / "self/stat").read_text().rsplit(")", 1)[1].split()
        started_s = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc_pid_stat(5)
        uptime_s = float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0
    return max(0.0, uptime_s - started_s)


class Triggers:
    """What wakes the main loop: stop (SIGTERM/SIGINT), reconcile now (SIGHUP), a mount change.

    Signal handlers only set flags: a handler that took a lock (threading.Event.set) could
    deadlock against the very wait it interrupts. The wake-up goes through a socketpair that
    signal.set_wakeup_fd writes to from C, and the loop waits on it with select. A mount or
    unmount anywhere in the agent's namespace marks /proc/self/mountinfo exceptional for select
    (proc_pid_mountinfo(5)): systemd-sysext merging over /usr hides the overlay on /usr/lib64.
    """

    def __init__(self) -> None:
        self.stop_requested = False
        self.reconcile_requested = False
        self.pass_requested = False  # a pass soon, nothing forgotten (`nvidia-agent stage`, the gate)
        self.mounts_changed = False
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._w.setblocking(False)
        self._mountinfo: IO[bytes] | None = None

    def watch_mounts(self, path: str = MOUNTINFO) -> None:
        """Wake on every mount change from now on (a no-op where the file cannot be opened)."""
        with contextlib.suppress(OSError):
            self._mountinfo = open(path, "rb")  # noqa: SIM115 - held open for the process's life

    @classmethod
    def install(cls) -> Triggers:
        t = cls()

        def on_stop(signum: int, _: FrameType | None) -> None:
            t.stop_requested = True

        def on_hup(signum: int, _: FrameType | None) -> None:
            t.reconcile_requested = True

        signal.set_wakeup_fd(t._w.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        return t

    def request_stop(self) -> None:
        """From another thread (tests): stop as a SIGTERM would."""
        self.stop_requested = True
        self.poke()

    def request_pass(self) -> None:
        """From another thread: run a pass as soon as none runs."""
        self.pass_requested = True
        self.poke()

    def poke(self) -> None:
        """Wake the loop (the worker finished a pass)."""
        with contextlib.suppress(BlockingIOError):
            self._w.send(b"\0")

    def wait(self, timeout_s: float) -> None:
        """Sleep up to `timeout_s`, or until a signal, a request or a poke arrives."""
        if self.stop_requested:
            return
        watched = [self._mountinfo] if self._mountinfo is not None else []
        ready, _, changed = select.select([self._r], [], watched, max(0.0, timeout_s))
        if changed:
            self.mounts_changed = True
        if ready:
            with contextlib.suppress(BlockingIOError):
                while self._r.recv(4096):
                    pass


class Readiness:
    """READY=1 goes out once: when the driver works (or there is no GPU), or at the deadline, degraded.

    Until then EXTEND_TIMEOUT_USEC= keeps systemd's start timeout from running out while the
    agent is alive and working towards its own deadline, so the unit's TimeoutStartSec= can
    stay short: a start that truly hangs is still caught.
    """

    def __init__(self, notifier: Notifier, timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 started_ago_s: float = 0.0) -> None:
        self.notifier = notifier
        # Counted from process start: interpreter start-up is part of what units ordered after us wait for.
        self.deadline = clock() + timeout_s - started_ago_s
        self.timeout_s = timeout_s
        self.sent = False
        self._clock = clock
        self._extended_at: float | None = None

    def update(self, phase: Phase, status: str, *, working: bool = False) -> str | None:
        """Send READY=1 if it is time; returns 'ready' or 'degraded' when it was sent now.

        `working`: the phase is degraded but a driver works (the previous one, still served).
        """
        if self.sent:
            return None
        if phase in (Phase.READY, Phase.NO_GPU) or working:
            self.sent = True
            self.notifier.send(READY="1", STATUS=f"{phase.value}: {status}")
            return "ready"
        if self._clock() >= self.deadline:
            self.sent = True
            self.notifier.send(READY="1", STATUS=f"degraded: {status}")
            return "degraded"
        return None

    def extend_if_due(self) -> None:
        """While not READY: EXTEND_TIMEOUT_USEC= every EXTEND_S / 3 (systemd >= 236)."""
        now = self._clock()
        if self.sent or (self._extended_at is not None and now - self._extended_at < EXTEND_S / 3):
            return
        self._extended_at = now
        self.notifier.send(EXTEND_TIMEOUT_USEC=str(int(EXTEND_S * 1_000_000)))

    def wait_cap_s(self) -> float | None:
        """How long the loop may sleep before the deadline or the next extension needs a look."""
        if self.sent:
            return None
        return max(0.0, min(self.deadline - self._clock(), EXTEND_S / 3))


class Worker:
    """Runs one reconcile at a time in a thread; the main thread starts it, reaps it and watches it.

    The main thread never blocks on the pipeline, so READY, the watchdog and a stop are served on
    time whatever the pipeline is waiting for (a registry, a subprocess, the disk). `cancel`
    carries the stop request into the pass and its heartbeat out of it.
    """

    def __init__(self, agent: Agent, cancel: Cancel, done: Callable[[], None]) -> None:
        self._agent = agent
        self._cancel = cancel
        self._done = done
        self._thread: threading.Thread | None = None
        self._finished = threading.Event()
        self._result: Phase | None = None
        self._job: Callable[[Cancel], Phase] = agent.reconcile

    @property
    def busy(self) -> bool:
        return self._thread is not None and not self._finished.is_set()

    def start(self, job: Callable[[Cancel], Phase] | None = None, cancel: Cancel | None = None) -> None:
        """Run a pass (or `job`: the stop's staging) under `cancel` (from now on: a cancelled one is spent)."""
        self._result = None
        self._finished.clear()
        self._job = job or self._agent.reconcile
        self._cancel = cancel or self._cancel
        self._cancel.beat_at = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._result = self._job(self._cancel)
        finally:
            self._finished.set()
            self._done()

    def take(self) -> Phase | None:
        """The finished pass's phase, once; None while running or idle."""
        if self._thread is None or not self._finished.is_set():
            return None
        self._thread.join()  # it has finished its work; this only waits for the thread to end
        self._thread = None
        return self._result

    def silent_s(self) -> float:
        """How long the running pass has not shown a sign of life."""
        return time.monotonic() - self._cancel.beat_at if self.busy else 0.0

    def join(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a running pass; whether none runs now."""
        return self._finished.wait(timeout_s) if self._thread is not None else True

    def stack(self) -> str:
        """Where the pass is stuck, for the log."""
        frame = sys._current_frames().get(self._thread.ident or -1) if self._thread else None
        return "".join(traceback.format_stack(frame)) if frame else ""


class OverlayWatch:
    """After a mount change, look once it settles whether the overlay is still what shows.

    A node mounts all day (every container start): only a change that hides the overlay (a
    later mount over the library directory or an ancestor, as systemd-sysext's merge on /usr)
    brings a pass, at once instead of at the next check interval.
    """

    def __init__(self, agent: Agent, triggers: Triggers, log: Any) -> None:
        self._agent, self._triggers, self._log = agent, triggers, log
        self._look_at: float | None = None

    def hidden(self, busy: bool) -> bool:
        """Whether a pass is due because the overlay is hidden (looked at only between passes)."""
        if busy:
            return False
        now = time.monotonic()
        if self._triggers.mounts_changed and self._look_at is None:
            self._triggers.mounts_changed = False
            self._look_at = now + MOUNTS_SETTLE_S
        if self._look_at is None or now < self._look_at:
            return False
        self._look_at = None
        snap = self._agent.snapshot
        if (snap.phase is not Phase.READY and not snap.serving) or self._agent.overlay_shown():
            return False
        self._log.warning("overlay_hidden", detail="a later mount covers the library directory "
                          "(a systemd-sysext merge on /usr?); mounting the overlay on top again")
        return True

    def wait_s(self, busy: bool) -> float | None:
        return None if busy or self._look_at is None else self._look_at - time.monotonic()


def run_daemon(agent: Agent, *, socket_path: Path, once: bool, triggers: Triggers,
               notifier: Notifier | None = None, cancel: Cancel | None = None) -> ExitCode:
    """Serve status and reconcile until stopped (or once). Returns the exit status.

    The main thread owns the systemd contract: READY (on time, even while a pass still runs),
    EXTEND_TIMEOUT_USEC while starting, the watchdog, and SIGTERM. Passes run in a Worker.
    """
    log = structlog.get_logger("nvidia-agent")
    notifier = notifier or Notifier(None)
    cancel = cancel or Cancel()
    agent.notify = _status_and_wake(notifier, triggers)
    readiness = Readiness(notifier, agent.settings.daemon.ready_timeout_s, started_ago_s=process_age_s())
    server, gate, signals = _serve(agent, socket_path, triggers, log, once=once)
    metrics = None if once else _serve_metrics(agent, log)
    worker = Worker(agent, cancel, triggers.poke)
    if agent.settings.mount.enabled and not once:
        triggers.watch_mounts()
    log.info("started", socket=str(socket_path), once=once, pid=os.getpid(),
             watchdog_s=notifier.watchdog_s, ready_timeout_s=readiness.timeout_s)
    failures = 0
    next_pass = time.monotonic()
    watch = OverlayWatch(agent, triggers, log)
    stopped = False
    progress = _ProgressStatus(agent, notifier)
    try:
        while True:
            phase = worker.take()
            if phase is not None:
                if once:
                    _report_ready(readiness, agent, log)
                    return phase.exit_code
                failures, delay = _schedule(agent, phase, failures)
                next_pass = time.monotonic() + delay
                agent.snapshot = agent.snapshot.evolve(
                    next_attempt_at=time.time() + delay if phase not in (Phase.READY, Phase.NO_GPU) else None)
            if _asked_for_a_pass(agent, triggers, watch, worker.busy):
                next_pass = time.monotonic()
            if not worker.busy and time.monotonic() >= next_pass:
                worker.start()
            _report_ready(readiness, agent, log)
            if worker.silent_s() > STALL_LIMIT_S:
                log.error("worker_hung", silent_s=round(worker.silent_s()), phase=agent.snapshot.phase.value,
                          stack=worker.stack(), hint="a bug: the agent exits so systemd restarts it")
                return ExitCode.FAILED
            _keep_systemd_told(notifier, readiness, progress)
            if readiness.sent:
                _test_wedge(log)
            waits = [LOOP_TICK_S, readiness.wait_cap_s(), notifier.ping_interval_s,
                     PROGRESS_STATUS_S if agent.snapshot.phase is Phase.PULLING else None,
                     None if worker.busy else next_pass - time.monotonic(),
                     watch.wait_s(worker.busy), gate.tend() if gate else None]
            triggers.wait(min(w for w in waits if w is not None))
            if triggers.stop_requested:
                stopped = True
                return ExitCode.OK  # a stop is success, whatever the pass was doing
    finally:
        if stopped:
            _finish_at_shutdown(agent, worker, cancel, notifier, log)
        cancel.request()
        notifier.send(STOPPING="1")
        finished = worker.join(STOP_GRACE_S)
        for closing in (server, gate, signals, metrics):
            if closing is not None:
                closing.stop()
        # Modules and the mount stay: a stopping agent must not take GPUs from running workloads.
        log.info("stopped", phase=agent.snapshot.phase.value, **({} if finished else {"abandoned": "reconcile"}))


def _status_and_wake(notifier: Notifier, triggers: Triggers) -> Callable[[str], None]:
    """What a pass calls at each phase: STATUS=, and the main loop woken, so READY goes out when the pass
    reaches it, not when the pass ends (it may stage the next boot's driver first) or at the loop's next tick."""
    def told(status: str) -> None:
        notifier.status(status)
        triggers.poke()
    return told


class _ProgressStatus:
    """STATUS= with the download's percentage, at most every PROGRESS_STATUS_S (systemctl status shows it)."""

    def __init__(self, agent: Agent, notifier: Notifier) -> None:
        self.agent, self.notifier = agent, notifier
        self.said_at, self.said = 0.0, ""

    def __call__(self) -> None:
        try:
            progress = self.agent.progress()
        except Exception:  # the main thread asks: nothing it reads may stop the systemd contract
            return
        if progress is None or time.monotonic() - self.said_at < PROGRESS_STATUS_S:
            return
        text = f"pulling: {render_progress(progress)}"
        if text != self.said:
            self.notifier.status(text)
        self.said_at, self.said = time.monotonic(), text


def _keep_systemd_told(notifier: Notifier, readiness: Readiness, progress: _ProgressStatus) -> None:
    """The watchdog fed, the start timeout extended while not READY, the download's progress in STATUS=."""
    notifier.ping_if_due()
    readiness.extend_if_due()
    progress()


def _with_progress(agent: Agent, snap: Snapshot) -> Snapshot:
    """The snapshot with the download's progress as of now (none if it cannot be told: `status` still answers)."""
    try:
        progress = agent.progress()
    except Exception:
        return snap
    return snap.evolve(progress=progress) if progress else snap


def _serve(agent: Agent, socket_path: Path, triggers: Triggers, log: Any, *,
           once: bool) -> tuple[StatusServer, GateKeeper | None, StatusSignals | None]:
    """The status socket (with `stage` and `rollback`); not for --once: the reboot gate where
    configured, and update_engine's StatusUpdate signal where it tells the next boot."""
    gate = None if once else GateKeeper.configured(agent, triggers, log)
    server = StatusServer(socket_path, lambda: _with_progress(agent, gate.snapshot() if gate else agent.snapshot),
                          on_error=_status_error(log), commands={"stage": _stage_command(agent, triggers, log),
                                                                 "rollback": _rollback_command(agent, triggers)})
    server.start()
    signals = None
    if not once and _source(agent) == "update_engine":
        last = [0.0]

        def changed(operation: str) -> None:
            log.info("update_status_changed", operation=operation)
            if time.monotonic() - last[0] >= SIGNAL_MIN_GAP_S:  # a wake, not a flood of passes
                last[0] = time.monotonic()
                triggers.request_pass()

        signals = StatusSignals(changed)
        if not signals.start():
            signals = None
    return server, gate, signals


def _serve_metrics(agent: Agent, log: Any) -> MetricsServer | None:
    """GET /metrics on export.listen, when set; an address that cannot be bound is a warning (the textfile and
    the driver work without it)."""
    listen = agent.settings.export.listen
    if not listen:
        return None
    from agent.fleet.serve import MetricsServer  # noqa: PLC0415 - see TYPE_CHECKING above

    server = MetricsServer(listen, agent.metrics)
    try:
        server.start()
    except HostError as exc:
        log.warning("metrics_not_served", error=exc.message, hint=exc.hint)
        return None
    return server


def _source(agent: Agent) -> str:
    """Who tells the next boot on this host (update.source resolved by the OS), "none" if unknown."""
    try:
        return source_for(agent.probe.os(), agent.settings.update.source)
    except AgentError:  # no os-release: the first pass says so
        return "none"


def _test_wedge(log: Any) -> None:
    """Fault injection for the watchdog test (WEDGE_ENV): stop the main loop without pinging."""
    if os.environ.get(WEDGE_ENV):
        log.warning("test_wedge", seconds=os.environ[WEDGE_ENV])
        time.sleep(float(os.environ[WEDGE_ENV]))


def _asked_for_a_pass(agent: Agent, triggers: Triggers, watch: OverlayWatch, busy: bool) -> bool:
    """Whether a pass is due before its time: the overlay was hidden, SIGHUP (which also forgets
    a refusal), or a request (`nvidia-agent stage`, the gate)."""
    due = watch.hidden(busy)
    if triggers.reconcile_requested and not busy:
        triggers.reconcile_requested = False
        agent.forget_refusal()
        due = True
    if triggers.pass_requested and not busy:
        triggers.pass_requested = False
        due = True
    return due


def _stage_command(agent: Agent, triggers: Triggers, log: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """`{"command": "stage", "kernel": K}`: a kernel package's postinst hook says the next boot runs K."""
    def stage(request: dict[str, Any]) -> dict[str, Any]:
        kernel = request.get("kernel")
        if not isinstance(kernel, str) or not KERNEL_RELEASE_RE.match(kernel):
            return {"ok": False, "error": "kernel: a release as uname -r prints it, such as 6.1.0-29-amd64"}
        source = _source(agent)
        if source != "kernel-postinst":
            return {"ok": False, "error": f"this host's next boot is told by {source} (update.source), "
                                          "not by kernel hooks: nothing to do"}
        reply = agent.request_stage(kernel)
        if reply.get("ok"):
            triggers.request_pass()
            log.info("stage_requested", next_kernel=kernel)
        return reply
    return stage


def _rollback_command(agent: Agent, triggers: Triggers) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """`{"command": "rollback", "undo": bool}`: go back to the previous tree for this kernel, or undo that."""
    def rollback(request: dict[str, Any]) -> dict[str, Any]:
        reply = agent.request_rollback(undo=request.get("undo") is True)
        if reply.get("ok"):
            triggers.request_pass()
        return reply
    return rollback


def _finish_at_shutdown(agent: Agent, worker: Worker, cancel: Cancel, notifier: Notifier, log: Any) -> None:
    """The system goes down while the next boot's driver is not staged (or an updater is asked and
    the last poll may have missed its update): finish it, within update.finish_s (the unit's
    TimeoutStopSec= leaves room for it). A `systemctl stop` or restart of the agent alone does
    not wait: the system is not going down then."""
    bound = agent.settings.update.finish_s
    nxt = agent.snapshot.next_boot
    if bound <= 0 or not agent.next_boot_pending():
        return
    try:
        if not agent.systemd.shutting_down():
            return
    except AgentError as exc:
        log.warning("shutdown_unknown", error=str(exc), detail="not waiting for the next boot's driver")
        return
    deadline = time.monotonic() + bound
    # room for the bound, then the worker's grace and the servers' stop
    notifier.send(EXTEND_TIMEOUT_USEC=str(int((bound + 2 * STOP_GRACE_S + 5) * 1_000_000)))
    log.info("finishing_next_boot", next_os=(nxt or {}).get("os_key"), state=(nxt or {}).get("state"), bound_s=bound)
    staging_now = worker.busy and agent.snapshot.phase is Phase.READY and (nxt or {}).get("state") == "staging"
    finish = cancel  # the pass already staging goes on under its own
    if worker.busy and not staging_now:  # this boot's pass: it no longer matters, the host goes down
        cancel.request()
        _wait_worker(worker, notifier, deadline)
    if not worker.busy and time.monotonic() < deadline and not staging_now:
        finish = Cancel()
        worker.start(agent.finish_staging, finish)
    _wait_worker(worker, notifier, deadline)
    nxt = agent.snapshot.next_boot or {}
    if worker.busy:
        finish.request()
        log.warning("next_boot_unfinished", next_os=nxt.get("os_key"), bound_s=bound,
                    detail="update.finish_s ran out: the next boot installs its driver itself (network needed)")
    elif nxt.get("state") == "ready":
        log.info("next_boot_finished", next_os=nxt.get("os_key"), state="ready")
    else:
        log.warning("next_boot_unfinished", next_os=nxt.get("os_key"), state=nxt.get("state"),
                    detail=f"{nxt.get('detail') or 'no staged update seen'}: the next boot installs its driver "
                           "itself (network needed)")


def _wait_worker(worker: Worker, notifier: Notifier, deadline: float) -> None:
    """Wait for the worker until `deadline`, feeding the watchdog."""
    while worker.busy and time.monotonic() < deadline:
        notifier.ping_if_due()
        worker.join(min(1.0, max(0.0, deadline - time.monotonic())))


class GateKeeper:
    """The reboot gate as the daemon runs it: started, restarted when its port was taken, its view
    merged into every status answer."""

    RETRY_S = 30.0

    def __init__(self, agent: Agent, gate: RebootGate, log: Any) -> None:
        self._agent, self._gate, self._log = agent, gate, log
        self._running = False
        self._retry_at = time.monotonic()
        self._error: str | None = None

    @classmethod
    def configured(cls, agent: Agent, triggers: Triggers, log: Any) -> GateKeeper | None:
        u = agent.settings.update
        if not u.gate_listen:
            return None
        from agent.update.gate import HOLD_FILE, RebootGate  # noqa: PLC0415 - see TYPE_CHECKING above

        gate = RebootGate(u.gate_listen, u.gate_upstream, hold_max_s=u.hold_max_s, snapshot=lambda: agent.snapshot,
                          source=_source(agent), looked=lambda: agent.next_boot_looked, poke=triggers.request_pass,
                          hold_file=agent.host(HOLD_FILE))
        keeper = cls(agent, gate, log)
        keeper.keep_serving()
        return keeper

    def keep_serving(self) -> None:
        if self._running or time.monotonic() < self._retry_at:
            return
        try:
            self._gate.start()
        except AgentError as exc:
            self._retry_at = time.monotonic() + self.RETRY_S
            if self._error != str(exc):
                self._log.error("gate_unavailable", error=str(exc), hint=exc.hint,
                                detail=f"the update agent's reboot requests fail until it listens; "
                                       f"retried every {self.RETRY_S:.0f}s")
            self._error = str(exc)
            return
        self._running, self._error = True, None

    def tend(self) -> float | None:
        """Start the gate if it is due a try; how long until it needs another look (None: serving)."""
        self.keep_serving()
        return None if self._running else max(0.0, self._retry_at - time.monotonic())

    def snapshot(self) -> Snapshot:
        view = self._gate.view() | ({"error": self._error} if self._error else {})
        return self._agent.snapshot.evolve(gate=view)

    def stop(self) -> None:
        if self._running:
            self._gate.stop()


def _schedule(agent: Agent, phase: Phase, failures: int) -> tuple[int, float]:
    """(failures so far, seconds to the next pass): the check interval when settled, else backoff."""
    settings = agent.settings.daemon
    if phase in (Phase.READY, Phase.NO_GPU):
        if phase is Phase.READY and agent.watches_updates:
            return 0, min(settings.check_interval_s, agent.settings.update.poll_s)
        return 0, settings.check_interval_s
    failures += 1
    return failures, next_delay_s(failures, settings.retry_initial_s, settings.retry_max_s, random.random())  # noqa: S311


def _report_ready(readiness: Readiness, agent: Agent, log: Any) -> None:
    snap = agent.snapshot
    sent = readiness.update(snap.phase, snap.detail or snap.phase.value, working=bool(snap.serving))
    if sent == "degraded":
        log.warning("ready_degraded", waited_s=readiness.timeout_s, phase=snap.phase.value, reason=snap.detail,
                    detail="units ordered after nvidia-agent start now; retrying in the background")


def _status_error(log: Any) -> Callable[[str, Exception], None]:
    limiter = RepeatLimiter(ERROR_LOG_PERIOD_S)

    def report(what: str, exc: Exception) -> None:
        if limiter.should_log(f"{what}:{type(exc).__name__}:{getattr(exc, 'errno', None)}")[0]:
            log.warning("status_socket_error", operation=what, error=f"{type(exc).__name__}: {exc}",
                        detail="status requests pause briefly and resume")
    return report
