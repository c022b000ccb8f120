"""Status protocol and socket, logging lines for journald, backoff, lock, atomic current switch."""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog
from structlog.testing import capture_logs

from agent import log
from agent.cancel import next_delay_s
from agent.daemon import LockHeld, acquire_lock
from agent.errors import ExitCode, TransientError, cause_chain
from agent.install.trees import current_target, remove_debris, switch_current
from agent.status import (
    MAX_CLIENTS,
    REQUEST_TIMEOUT_S,
    Phase,
    Snapshot,
    StatusServer,
    handle_request,
    query,
    render_text,
)


@pytest.mark.parametrize(("request_bytes", "ok", "error"), [
    (b'{"command": "status"}\n', True, None),
    (b'{"command": "reload"}\n', False, "unknown command"),
    (b"not json\n", False, "not JSON"),
    (b"[1, 2]\n", False, "unknown command"),
    (b"x" * 5000, False, "larger than"),
    (b"", False, "unknown command"),
])
def test_socket_protocol_refuses_anything_but_status(request_bytes: bytes, ok: bool, error: str | None) -> None:
    """Hostile or unknown requests get an error reply, never an exception."""
    reply = handle_request(request_bytes, Snapshot())
    assert reply["ok"] is ok
    if error:
        assert error in reply["error"]


@pytest.mark.parametrize(("uid", "ok"), [(0, True), (1000, False), (None, False)])
def test_commands_that_change_the_daemon_are_for_root_only(uid: int | None, ok: bool) -> None:
    """`stage` and `rollback` go through only for a peer whose uid the kernel says is 0; `status`
    is for everyone who may connect. A command that raises is an error reply, not a dead server."""
    called: list[dict[str, object]] = []

    def stage(request: dict[str, object]) -> dict[str, object]:
        called.append(request)
        return {"ok": True}

    commands = {"stage": stage, "rollback": lambda _r: 1 / 0}
    reply = handle_request(b'{"command": "stage", "kernel": "6.1.0-29-amd64"}\n', Snapshot(), uid=uid,
                           commands=commands)  # type: ignore[arg-type]
    assert reply["ok"] is ok and bool(called) is ok
    if not ok:
        assert f"uid {uid}" in reply["error"]
    assert handle_request(b'{"command": "status"}\n', Snapshot(), uid=uid)["ok"]
    if uid == 0:
        broken = handle_request(b'{"command": "rollback"}\n', Snapshot(), uid=0, commands=commands)  # type: ignore[arg-type]
        assert not broken["ok"] and "ZeroDivisionError" in broken["error"]
    unknown = handle_request(b'{"command": "reboot"}\n', Snapshot(), uid=0, commands=commands)  # type: ignore[arg-type]
    assert "supported: status, rollback, stage" in unknown["error"]


@pytest.mark.parametrize(("phase", "code"), [
    (Phase.READY, ExitCode.OK), (Phase.NO_GPU, ExitCode.OK), (Phase.DEGRADED, ExitCode.DEGRADED),
    (Phase.PULLING, ExitCode.DEGRADED), (Phase.FAILED, ExitCode.FAILED),
])
def test_exit_codes_scripts_can_rely_on(phase: Phase, code: ExitCode) -> None:
    """0 ready (or no GPU), 2 degraded or not yet ready, 1 failed."""
    assert phase.exit_code == code


def test_server_replaces_a_stale_socket_and_answers(tmp_path: Path) -> None:
    """A socket file left by a crashed daemon is replaced; the reply is the current snapshot."""
    path = tmp_path / "run/status.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    snap = Snapshot(phase=Phase.READY, kernel="6.1.0-28-amd64", version="t")
    server = StatusServer(path, lambda: snap)
    server.start()
    try:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        status = query(path)
        assert status["phase"] == "ready"
        assert status["kernel"] == "6.1.0-28-amd64"
        with socket.socket(socket.AF_UNIX) as raw:  # a client that sends garbage gets an error line
            raw.connect(str(path))
            raw.sendall(b"hello\n")
            assert json.loads(raw.makefile().readline())["ok"] is False
    finally:
        server.stop()
    assert not path.exists()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[StatusServer, list[tuple[str, Exception]]]]:
    errors: list[tuple[str, Exception]] = []
    srv = StatusServer(tmp_path / "status.sock", lambda: Snapshot(phase=Phase.READY),
                       on_error=lambda what, exc: errors.append((what, exc)))
    srv.start()
    yield srv, errors
    srv.stop()


def test_a_slow_client_blocks_nobody_and_is_dropped(server: tuple[StatusServer, list[tuple[str, Exception]]]) -> None:
    """One client sends a byte every 0.3 s and never a newline; others are answered meanwhile, and
    the slow one is cut off after REQUEST_TIMEOUT_S."""
    srv, _ = server
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(str(srv.path))
    started = time.monotonic()
    answered = []
    cut_off_after = None
    while time.monotonic() - started < REQUEST_TIMEOUT_S + 2:
        try:
            slow.send(b"{")
        except OSError:  # the server closed it
            cut_off_after = time.monotonic() - started
            break
        answered.append(query(srv.path, timeout_s=0.5)["phase"])
        time.sleep(0.3)
    slow.close()
    assert answered and set(answered) == {"ready"}
    assert cut_off_after is not None and REQUEST_TIMEOUT_S <= cut_off_after < REQUEST_TIMEOUT_S + 1.5


def test_many_silent_clients_do_not_starve_the_server(server: tuple[StatusServer, list[tuple[str, Exception]]]) -> None:
    """More silent connections than MAX_CLIENTS: the surplus is closed at once, a real query still works
    once the silent ones time out, and the server thread lives on."""
    srv, _ = server
    silent = []
    for _ in range(MAX_CLIENTS + 10):
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(srv.path))
        silent.append(s)
    try:
        assert query(srv.path, timeout_s=REQUEST_TIMEOUT_S + 3)["phase"] == "ready"
    finally:
        for s in silent:
            s.close()


def test_accept_errors_pause_the_server_instead_of_ending_it(
        server: tuple[StatusServer, list[tuple[str, Exception]]], monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE from accept() is reported and accepting resumes: the next query is answered."""
    srv, errors = server
    real = socket.socket.accept
    failures = iter(range(3))

    def accept(sock: socket.socket) -> tuple[socket.socket, object]:
        if next(failures, None) is not None:
            raise OSError(errno.EMFILE, "Too many open files")
        return real(sock)

    monkeypatch.setattr(socket.socket, "accept", accept)
    assert query(srv.path, timeout_s=5)["phase"] == "ready"
    assert [(what, getattr(exc, "errno", None)) for what, exc in errors][:1] == [("accept", errno.EMFILE)]


def test_stop_is_prompt(tmp_path: Path) -> None:
    """Stopping the server does not wait for an accept timeout: the thread is woken."""
    srv = StatusServer(tmp_path / "s.sock", Snapshot)
    srv.start()
    started = time.monotonic()
    srv.stop()
    assert time.monotonic() - started < 0.2
    assert not (tmp_path / "s.sock").exists()


def chained_error() -> TransientError:
    """A registry error caused by a refused connection, raised for real so it has a cause chain."""
    try:
        try:
            raise OSError("connection refused")
        except OSError as inner:
            raise TransientError("resolve reg/x:1: registry unreachable", hint="check image.registry") from inner
    except TransientError as exc:
        return exc
    raise AssertionError("unreachable")


def test_text_status_shows_error_chain_and_hint() -> None:
    """The human view names the phase, the error, its causes and what to do."""
    causes = cause_chain(chained_error())
    snap = Snapshot(phase=Phase.DEGRADED, detail="x").to_json()
    snap["last_error"] = {"message": causes[0], "hint": "check image.registry", "causes": causes, "at": 0}
    text = render_text(snap)
    assert "phase:       degraded" in text
    assert "caused by: connection refused" in text
    assert "to fix:    check image.registry" in text


def test_journal_lines_carry_the_syslog_priority(capsys: pytest.CaptureFixture[str]) -> None:
    """Under journald each event is one line starting <N> so `journalctl -p warning` filters it."""
    log.configure(journal=True)
    logger = structlog.get_logger()
    logger.info("ready", tree="/opt/nvidia/535/x")
    logger.warning("degraded", error="tag missing", hint="push it")
    logger.error("degraded", error="a b")
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["<6>ready tree=/opt/nvidia/535/x", '<4>degraded error="tag missing" hint="push it"',
                     '<3>degraded error="a b"']


def test_repeat_limiter_logs_once_per_period() -> None:
    """A failure repeating every retry is logged once per period, with the count suppressed."""
    now = [0.0]
    limiter = log.RepeatLimiter(60, clock=lambda: now[0])
    assert limiter.should_log("e") == (True, 0)
    now[0] = 10
    assert limiter.should_log("e") == (False, 1)
    assert limiter.should_log("e") == (False, 2)
    now[0] = 61
    assert limiter.should_log("e") == (True, 2)


def test_phase_events_are_captured_as_structlog_events() -> None:
    """capture_logs sees the event name and context fields an operator greps for."""
    with capture_logs() as logs:
        structlog.get_logger().info("pulling", digest="sha256:x", layers=2)
    assert logs == [{"event": "pulling", "digest": "sha256:x", "layers": 2, "log_level": "info"}]


@pytest.mark.parametrize(("failures", "delay"), [(0, 0), (1, 10), (2, 20), (3, 40), (7, 600), (100, 600)])
def test_backoff_doubles_and_caps(failures: int, delay: float) -> None:
    """Retries back off exponentially from retry_initial_s up to retry_max_s; jitter takes at most a quarter off."""
    assert next_delay_s(failures, 10, 600) == delay
    assert next_delay_s(failures, 10, 600, 0.999) == pytest.approx(delay * (1 - 0.25 * 0.999))
    assert delay * 0.75 <= next_delay_s(failures, 10, 600, 0.5) <= delay


def test_lock_refuses_a_second_holder(tmp_path: Path) -> None:
    """The second acquire fails naming the first holder's PID."""
    first = acquire_lock(tmp_path / "lock")
    try:
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            acquire_lock(tmp_path / "lock")
    finally:
        first.close()
    acquire_lock(tmp_path / "lock").close()  # free again once the holder is gone


def test_switch_current_is_a_relative_symlink_replaced_atomically(tmp_path: Path) -> None:
    """current always exists during a switch and points relative, so /host mounts see the same."""
    a, b = tmp_path / "535/a", tmp_path / "535/b"
    a.mkdir(parents=True)
    b.mkdir()
    switch_current(tmp_path, a)
    assert os.readlink(tmp_path / "current") == "535/a"
    switch_current(tmp_path, b)
    assert os.readlink(tmp_path / "current") == "535/b"
    assert current_target(tmp_path) == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["535", "current"]


def test_debris_of_interrupted_installs_is_removed(tmp_path: Path) -> None:
    """Staging, trash and a half-made `current` link never block the next try; trees and current stay.

    One staging directory is nested 2,000 levels deep (what a crash on a hostile image left
    before paths were capped): removing it needs neither recursion nor 2,000 open files.
    """
    for name in (".staging-535-x-1", ".trash-535-x-2", "535"):
        (tmp_path / name / "sub").mkdir(parents=True)
    deep = tmp_path / ".staging-535-deep"
    deep.mkdir()
    fd = os.open(deep, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(2000):  # deeper than PATH_MAX allows by name: built one level at a time
        os.mkdir("d", dir_fd=fd)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    (tmp_path / ".current.tmp-77").symlink_to("535")
    (tmp_path / "current").symlink_to("535")
    reports: list[tuple[str, OSError | None]] = []
    remove_debris(tmp_path, lambda path, error: reports.append((path.name, error)))
    assert sorted(reports, key=lambda r: r[0]) == [(".current.tmp-77", None), (".staging-535-deep", None),
                                                    (".staging-535-x-1", None), (".trash-535-x-2", None)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["535", "current"]


def test_debris_that_cannot_be_removed_is_reported_not_raised(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Cleaning up can never fail the agent: an undeletable directory is reported with its error."""
    from agent.install import fs  # noqa: PLC0415

    (tmp_path / ".staging-535-x-1" / "sub").mkdir(parents=True)
    (tmp_path / ".trash-535-x-2").mkdir()
    real = fs.try_remove_tree

    def stuck(path: Path) -> OSError | None:
        return OSError(16, "Device or resource busy") if path.name.startswith(".staging") else real(path)

    monkeypatch.setattr(fs, "try_remove_tree", stuck)
    reports: list[tuple[str, str | None]] = []
    remove_debris(tmp_path, lambda path, error: reports.append((path.name, error and error.strerror)))
    assert sorted(reports) == [(".staging-535-x-1", "Device or resource busy"), (".trash-535-x-2", None)]


@pytest.mark.parametrize(("ages", "keep", "protected", "pruned"), [
    ({"535/a": 1, "535/b": 2, "535/c": 3}, 3, set(), []),
    ({"535/a": 1, "535/b": 2, "535/c": 3, "535/d": 4}, 3, set(), ["535/a"]),
    ({"535/a": 1, "535/b": 2, "535/c": 3, "535/d": 4}, 1, {"535/a"}, ["535/d", "535/c", "535/b"]),
    ({"535/a": 1, "535/b": 2}, 1, {"535/a", "535/b"}, []),
    # Other drivers' trees go before the configured driver's older kernels (an OS rollback needs those).
    ({"535/old-kernel": 1, "470/x": 2, "550/y": 3, "535/new-kernel": 4}, 3, {"535/new-kernel"}, ["470/x"]),
    ({"535/old-kernel": 1, "470/x": 2, "550/y": 3, "535/new-kernel": 4}, 2, {"535/new-kernel"},
     ["550/y", "470/x"]),
])
def test_trees_to_prune_keeps_the_active_then_the_driver_then_the_newest(
        ages: dict[str, float], keep: int, protected: set[str], pruned: list[str]) -> None:
    """keep_trees counts the active tree; the configured driver's trees outrank other drivers'."""
    from agent.install.trees import trees_to_prune  # noqa: PLC0415

    trees = [(Path(n), t) for n, t in ages.items()]
    assert trees_to_prune(trees, keep, {Path(p) for p in protected}, "535") == [Path(p) for p in pruned]


def test_cause_chain_keeps_hints_out_of_messages() -> None:
    """Each cause appears once, as its message; the hint travels separately."""
    assert cause_chain(chained_error()) == ["resolve reg/x:1: registry unreachable", "connection refused"]


def test_a_settled_host_is_rechecked_quietly(tmp_path: Path) -> None:
    """A no-GPU host: the first reconcile logs no-gpu at info; re-checks that find the same log at debug only."""
    from agent.bus import Systemd  # noqa: PLC0415
    from agent.config import ImageSettings, Settings  # noqa: PLC0415
    from agent.fetch.registry import RegistryClient  # noqa: PLC0415
    from agent.hostfacts import HostProbe  # noqa: PLC0415
    from agent.hostroot import HostRoot  # noqa: PLC0415
    from agent.reconcile import Agent  # noqa: PLC0415
    from tests.conftest import write  # noqa: PLC0415
    from tests.test_hostfacts import FakeUdev  # noqa: PLC0415

    write(tmp_path / "etc/os-release", "ID=flatcar\nVERSION_ID=3815.2.0\n")
    write(tmp_path / "proc/sys/kernel/osrelease", "6.1.0-28-amd64\n")

    def no_bus() -> object:
        raise RuntimeError("no system bus here")

    settings = Settings(image=ImageSettings(registry="registry.example"))
    agent = Agent(HostRoot(tmp_path), settings, probe=HostProbe(HostRoot(tmp_path), udev=FakeUdev([])),
                  registry=RegistryClient(), systemd=Systemd(bus_factory=no_bus))
    with capture_logs() as first:
        assert agent.reconcile() is Phase.NO_GPU
    with capture_logs() as again:
        assert agent.reconcile() is Phase.NO_GPU
    info = lambda logs: [e["event"] for e in logs if e["log_level"] != "debug"]  # noqa: E731
    assert info(first) == ["units", "units_not_reloaded", "no-gpu"]
    assert info(again) == []
    assert (tmp_path / "etc/systemd/system/kubelet.service.d/50-nvidia-agent.conf").is_file()


def test_a_crash_is_logged_with_its_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    """A bug's traceback reaches the journal: the event line, then the traceback lines, each with the
    same priority prefix (journald makes one entry per line)."""
    log.configure(journal=True)
    try:
        raise KeyError("lost")
    except KeyError:
        structlog.get_logger("t").exception("reconcile_crashed", error="KeyError: 'lost'")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("<3>reconcile_crashed ")
    assert all(line.startswith("<3>  ") for line in lines[1:])
    assert any("Traceback (most recent call last)" in line for line in lines)
    assert lines[-1] == "<3>  KeyError: 'lost'"
