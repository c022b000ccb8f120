"""The systemd contract from the agent's side: READY only when the driver works, or degraded at the deadline."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import daemon
from agent.cancel import Cancel
from agent.config import DaemonSettings, Settings, UpdateSettings
from agent.daemon import EXTEND_S, Readiness, Triggers, _schedule, run_daemon
from agent.errors import ExitCode
from agent.hostfacts import OSInfo
from agent.notify import Notifier
from agent.status import Phase, Snapshot


class SystemdSocket:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.path = path

    def messages(self) -> list[dict[str, str]]:
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().splitlines()))


@pytest.fixture
def systemd(tmp_path: Path) -> SystemdSocket:
    return SystemdSocket(tmp_path / "notify")


def test_notifier_sends_datagrams_and_handles_no_socket(systemd: SystemdSocket) -> None:
    """KEY=value lines in one datagram; without NOTIFY_SOCKET nothing is sent and nothing fails."""
    n = Notifier.from_env({"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "2000000"})
    assert n.send(READY="1", STATUS="ready: line\nbreak")
    assert systemd.messages() == [{"READY": "1", "STATUS": "ready: line break"}]
    assert n.ping_interval_s == 1.0
    assert Notifier.from_env({}).send(READY="1") is False


def test_watchdog_only_for_our_pid() -> None:
    """WATCHDOG_PID naming another process means the watchdog is not ours to feed."""
    assert Notifier.from_env({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_s is None


def test_ping_if_due_respects_half_the_period(systemd: SystemdSocket) -> None:
    """Pings go out at half the watchdog period, not on every call."""
    now = [0.0]
    n = Notifier(str(systemd.path), 10_000_000, clock=lambda: now[0])
    n.ping_if_due()
    now[0] = 4.9
    n.ping_if_due()
    assert systemd.messages() == []
    now[0] = 5.0
    n.ping_if_due()
    assert systemd.messages() == [{"WATCHDOG": "1"}]


@pytest.mark.parametrize(("phases", "at", "expect"), [
    ([Phase.READY], 0, ["ready"]),
    ([Phase.NO_GPU], 0, ["ready"]),
    ([Phase.DEGRADED, Phase.DEGRADED], 5, [None, None]),
    ([Phase.DEGRADED, Phase.DEGRADED, Phase.READY], 22, [None, "degraded", None]),
])
def test_readiness_table(systemd: SystemdSocket, phases: list[Phase], at: float, expect: list[str | None]) -> None:
    """READY=1 once: at the first working driver, or degraded when ready_timeout_s has passed."""
    now = [0.0]
    r = Readiness(Notifier(str(systemd.path)), 10, clock=lambda: now[0])
    got = []
    for i, phase in enumerate(phases):
        now[0] = at * i / max(1, len(phases) - 1)
        got.append(r.update(phase, "x"))
    assert got == expect
    sent = systemd.messages()
    assert len([m for m in sent if m.get("READY") == "1"]) == (1 if any(expect) else 0)


class _OSProbe:
    def os(self) -> OSInfo:
        return OSInfo("debian", "12", "Debian GNU/Linux 12", False)


class DaemonFacing:
    """What the daemon asks of an agent besides its passes: the OS (the update source), whether a stop
    must wait for the next boot's driver (never, here), and a download's progress (none)."""

    probe = _OSProbe()

    def next_boot_pending(self) -> bool:
        return False

    def progress(self) -> dict[str, Any] | None:
        return None  # no download in flight


@dataclass
class FakeAgent(DaemonFacing):
    """Fails `fail_times` reconciles, then works; records the STATUS texts it was given."""

    fail_times: int
    settings: Settings
    snapshot: Snapshot = field(default_factory=Snapshot)
    notify: Any = None
    calls: int = 0
    watches_updates: bool = False  # no OS updater asked (agent.update): the ready interval is check_interval_s

    def reconcile(self, cancelled: Any) -> Phase:
        self.calls += 1
        cancelled()
        phase = Phase.DEGRADED if self.calls <= self.fail_times else Phase.READY
        self.snapshot = self.snapshot.evolve(phase=phase, detail="no image for this kernel" if phase is
                                             Phase.DEGRADED else "driver 1.0")
        self.notify(f"{phase.value}: {self.snapshot.detail}")
        return phase


def test_daemon_reports_degraded_ready_then_recovers_without_restart(tmp_path: Path, systemd: SystemdSocket) -> None:
    """No driver by the deadline: READY=1 with a degraded STATUS; later the driver works and STATUS says ready."""
    settings = Settings(daemon=DaemonSettings(ready_timeout_s=0.3, retry_initial_s=0.1, retry_max_s=0.1))
    agent = FakeAgent(fail_times=5, settings=settings)
    triggers = Triggers()

    def stop_when_ready() -> None:
        while agent.snapshot.phase is not Phase.READY:
            time.sleep(0.02)
        triggers.request_stop()

    threading.Thread(target=stop_when_ready, daemon=True).start()
    code = run_daemon(agent, socket_path=tmp_path / "s.sock", once=False, triggers=triggers,  # type: ignore[arg-type]
                      notifier=Notifier(str(systemd.path)))
    assert code == 0
    messages = systemd.messages()
    ready = [m for m in messages if m.get("READY") == "1"]
    assert ready == [{"READY": "1", "STATUS": "degraded: no image for this kernel"}]
    statuses = [m["STATUS"] for m in messages if "STATUS" in m]
    assert statuses.index("degraded: no image for this kernel") < statuses.index("ready: driver 1.0")
    assert all(s.startswith(("ready", "degraded")) for s in statuses), statuses
    assert messages[-1] == {"STOPPING": "1"}
    assert agent.calls == 6


@pytest.mark.timeout(60)
def test_signal_storm_never_deadlocks_the_wait() -> None:
    """Thousands of SIGHUPs during short waits, then SIGTERM: the loop always wakes and stops.

    Handlers that took a lock (threading.Event.set) could deadlock against an interrupted wait;
    these only set flags and the wake-up goes through set_wakeup_fd.
    """
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    triggers = Triggers.install()
    done = threading.Event()
    looping = threading.Event()

    def storm() -> None:
        looping.wait(10)
        for _ in range(3000):
            os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)
        done.set()

    try:
        threading.Thread(target=storm, daemon=True).start()
        rounds = 0
        while not triggers.stop_requested:
            triggers.wait(0.01)
            rounds += 1
            looping.set()
        assert done.wait(10)
        assert rounds > 0
    finally:
        signal.set_wakeup_fd(-1)
        for s, h in saved.items():
            signal.signal(s, h)


def test_ready_status_keeps_the_phase_word(systemd: SystemdSocket) -> None:
    """StatusText after READY=1 starts with the phase (seen in the guest: it lost 'ready: ')."""
    r = Readiness(Notifier(str(systemd.path)), 10)
    r.update(Phase.READY, "driver 535 for flatcar-1")
    assert systemd.messages() == [{"READY": "1", "STATUS": "ready: driver 535 for flatcar-1"}]


def test_process_age_reads_proc(tmp_path: Path) -> None:
    """The READY deadline counts from process start: starttime (ticks) against uptime."""
    import os  # noqa: PLC0415

    from agent.daemon import process_age_s  # noqa: PLC0415

    ticks = os.sysconf("SC_CLK_TCK")
    (tmp_path / "self").mkdir()
    fields = ["S"] + ["0"] * 18 + [str(100 * ticks)] + ["0"] * 10
    (tmp_path / "self/stat").write_text("42 (python3 (x)) " + " ".join(fields) + "\n")
    (tmp_path / "uptime").write_text("112.5 200.0\n")
    assert process_age_s(tmp_path) == pytest.approx(12.5)
    assert process_age_s(tmp_path / "missing") == 0.0


@dataclass
class BlockedAgent(DaemonFacing):
    """A pass that waits on the stop request (as an interruptible pull does), or ignores it for `stubborn_s`."""

    settings: Settings
    stubborn_s: float = 0.0
    snapshot: Snapshot = field(default_factory=lambda: Snapshot(phase=Phase.PULLING, detail="registry silent"))
    notify: Any = None
    refusals_forgotten: int = 0
    watches_updates: bool = False

    def reconcile(self, cancel: Cancel) -> Phase:
        if self.stubborn_s:
            time.sleep(self.stubborn_s)  # a socket read that no flag can interrupt
        while not cancel():
            time.sleep(0.01)
        return Phase.DEGRADED

    def forget_refusal(self) -> None:
        self.refusals_forgotten += 1


def run_in_thread(agent: Any, tmp_path: Path, notifier: Notifier, triggers: Triggers,
                  **kwargs: Any) -> tuple[threading.Thread, list[int]]:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(run_daemon(
        agent, socket_path=tmp_path / "s.sock", once=False, triggers=triggers, notifier=notifier, **kwargs)))
    thread.start()
    return thread, result


def test_ready_goes_out_on_time_while_a_pass_is_still_running(tmp_path: Path, systemd: SystemdSocket,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull that never ends does not hold READY past ready_timeout_s; the watchdog is fed and the start
    timeout extended meanwhile; a stop then ends the pass and the daemon with exit 0."""
    monkeypatch.setattr(daemon, "process_age_s", lambda: 0.0)  # as if this process had just started
    agent = BlockedAgent(Settings(daemon=DaemonSettings(ready_timeout_s=0.5)))
    triggers = Triggers()
    notifier = Notifier(str(systemd.path), watchdog_usec=400_000)
    thread, result = run_in_thread(agent, tmp_path, notifier, triggers)
    time.sleep(1.5)
    messages = systemd.messages()
    triggers.request_stop()
    thread.join(10)
    assert result == [0]
    assert {"READY": "1", "STATUS": "degraded: registry silent"} in messages
    assert sum(1 for m in messages if m.get("WATCHDOG") == "1") >= 3, messages
    assert messages[0] == {"EXTEND_TIMEOUT_USEC": str(int(EXTEND_S * 1_000_000))}
    assert systemd.messages()[-1] == {"STOPPING": "1"}


@dataclass
class StagingAgent(DaemonFacing):
    """A pass that reaches READY, then stages the next boot's driver (here: until the test lets it go)."""

    settings: Settings
    snapshot: Snapshot = field(default_factory=Snapshot)
    notify: Any = None
    watches_updates: bool = False
    staged: threading.Event = field(default_factory=threading.Event)

    def reconcile(self, cancel: Cancel) -> Phase:
        time.sleep(0.3)  # the checks: meanwhile the main loop has gone to sleep
        self.snapshot = self.snapshot.evolve(phase=Phase.READY, detail="driver 1.0")
        self.notify("ready: driver 1.0")
        while not self.staged.wait(0.01) and not cancel():  # the next boot's download
            pass
        return Phase.READY


def test_ready_goes_out_when_the_pass_reaches_it_not_when_the_pass_ends(tmp_path: Path,
                                                                         systemd: SystemdSocket) -> None:
    """READY=1 follows the phase at once, while the same pass still stages the next boot's driver: kubelet
    is not kept waiting for a download it does not need (nor for the main loop's next tick)."""
    agent = StagingAgent(Settings())
    triggers = Triggers()
    thread, result = run_in_thread(agent, tmp_path, Notifier(str(systemd.path)), triggers)
    try:
        deadline = time.monotonic() + 2.0  # well inside LOOP_TICK_S: only the phase change can have woken it
        seen: list[dict[str, str]] = []
        while time.monotonic() < deadline and not any(m.get("READY") == "1" for m in seen):
            seen += systemd.messages()
        assert {"READY": "1", "STATUS": "ready: driver 1.0"} in seen, seen
        assert thread.is_alive() and not agent.staged.is_set()  # the pass had not ended
    finally:
        agent.staged.set()
        triggers.request_stop()
        thread.join(10)
    assert result == [0]


def test_a_stop_does_not_wait_for_a_pass_that_cannot_be_interrupted(tmp_path: Path, systemd: SystemdSocket,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass blocked where no flag reaches it (a socket read) costs a stop STOP_GRACE_S at most, and
    the stop is still a success."""
    monkeypatch.setattr(daemon, "STOP_GRACE_S", 0.3)
    agent = BlockedAgent(Settings(), stubborn_s=5)
    triggers = Triggers()
    thread, result = run_in_thread(agent, tmp_path, Notifier(str(systemd.path)), triggers)
    time.sleep(0.2)
    started = time.monotonic()
    with capture_logs() as logs:
        triggers.request_stop()
        thread.join(10)
    assert result == [0]
    assert time.monotonic() - started < 2
    assert [e.get("abandoned") for e in logs if e["event"] == "stopped"] == ["reconcile"]


def test_a_hung_pass_ends_the_daemon_with_its_stack(tmp_path: Path, systemd: SystemdSocket,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass silent past STALL_LIMIT_S is a bug: logged with where it hangs, and the daemon exits 1 so
    systemd restarts it (rather than pinging the watchdog forever for a dead pipeline)."""
    monkeypatch.setattr(daemon, "STALL_LIMIT_S", 0.3)
    monkeypatch.setattr(daemon, "LOOP_TICK_S", 0.1)
    monkeypatch.setattr(daemon, "STOP_GRACE_S", 0.1)
    agent = BlockedAgent(Settings(), stubborn_s=3)
    with capture_logs() as logs:
        code = run_daemon(agent, socket_path=tmp_path / "s.sock", once=False,  # type: ignore[arg-type]
                          triggers=Triggers(), notifier=Notifier(str(systemd.path)))
    assert code == ExitCode.FAILED
    hung = [e for e in logs if e["event"] == "worker_hung"]
    assert len(hung) == 1 and "time.sleep(self.stubborn_s)" in hung[0]["stack"]


def test_reload_asks_to_retry_a_refused_tree(tmp_path: Path, systemd: SystemdSocket) -> None:
    """SIGHUP (systemctl reload) runs a pass at once and forgets a remembered kernel refusal first."""
    agent = FakeAgent(fail_times=0, settings=Settings())
    forgotten: list[int] = []
    agent.forget_refusal = lambda: forgotten.append(1)  # type: ignore[attr-defined]
    triggers = Triggers()
    thread, result = run_in_thread(agent, tmp_path, Notifier(str(systemd.path)), triggers)
    deadline = time.monotonic() + 5
    while agent.calls < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    triggers.reconcile_requested = True
    triggers.poke()
    while agent.calls < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    triggers.request_stop()
    thread.join(10)
    assert (agent.calls, forgotten, result) == (2, [1], [0])


def test_a_retry_sleep_ends_at_once_when_the_agent_stops() -> None:
    """Backoff sleeps (the registry's tenacity retries sleep on Cancel) end with Cancelled the moment a
    stop is requested, not when the sleep would have ended."""
    from agent.errors import Cancelled  # noqa: PLC0415

    cancel = Cancel()
    threading.Timer(0.2, cancel.request).start()
    started = time.monotonic()
    with pytest.raises(Cancelled):
        cancel.sleep(30)
    assert time.monotonic() - started < 2


def test_a_notify_socket_nobody_drains_does_not_stall_the_agent(systemd: SystemdSocket,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full notify socket (a busy or stuck PID 1; the kernel queues only ~10 datagrams) costs a send
    SEND_TIMEOUT_S at most: the message is dropped, the agent goes on."""
    from agent import notify  # noqa: PLC0415

    monkeypatch.setattr(notify, "SEND_TIMEOUT_S", 0.2)
    n = Notifier(str(systemd.path))
    sent = 0
    started = time.monotonic()
    while n.send(STATUS=f"pulling: {sent}") and sent < 10_000:
        sent += 1
    assert 0 < sent < 10_000, "the queue never filled"
    assert time.monotonic() - started < 5


def test_a_ready_host_asks_the_os_updater_every_poll_s() -> None:
    settings = Settings(daemon=DaemonSettings(check_interval_s=300), update=UpdateSettings(poll_s=60))
    agent = FakeAgent(fail_times=0, settings=settings)
    assert _schedule(agent, Phase.READY, 3) == (0, 300)  # type: ignore[arg-type]
    agent.watches_updates = True
    assert _schedule(agent, Phase.READY, 0) == (0, 60)  # type: ignore[arg-type]
    assert _schedule(agent, Phase.NO_GPU, 0) == (0, 300)  # type: ignore[arg-type]
    failures, delay = _schedule(agent, Phase.DEGRADED, 0)  # type: ignore[arg-type]
    assert failures == 1 and 0.75 * settings.daemon.retry_initial_s <= delay <= settings.daemon.retry_initial_s
