"""The reboot gate: FleetLock requests checked (tables and generated input), decisions (a table),
and the gate served over real HTTP on loopback to a client speaking the protocol as Zincati does,
in front of a real FleetLock server stand-in (a counting semaphore, the spec's semantics)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st

from agent.status import Phase, Snapshot
from agent.update.fleetlock import Hold, Rejection, Request, decide, parse_request
from agent.update.gate import RebootGate, parse_listen, upstream_url

BODY = json.dumps({"client_params": {"id": "c988d2509fdf4cdcbed39037c56406fb", "group": "default"}}).encode()
STAGED = {"os_key": "flatcar-3139.2.1-6.1.0-29-amd64", "state": "ready", "detail": "installed"}
MISSING = {"os_key": "flatcar-3139.2.1-6.1.0-29-amd64", "state": "missing", "detail": "no image yet: 404"}


# --- requests as the protocol defines them

@pytest.mark.parametrize(("path", "header", "body", "kind"), [
    ("/v1/reboot", "true", BODY, "unknown_endpoint"),
    ("/v1/pre-reboot", None, BODY, "missing_protocol_header"),
    ("/v1/pre-reboot", "false", BODY, "missing_protocol_header"),
    ("/v1/pre-reboot", "true", b"not json", "invalid_body"),
    ("/v1/pre-reboot", "true", b"[]", "invalid_body"),
    ("/v1/pre-reboot", "true", b'{"client_params": {"group": "default"}}', "invalid_client_id"),
    ("/v1/pre-reboot", "true", b'{"client_params": {"id": "", "group": "default"}}', "invalid_client_id"),
    ("/v1/pre-reboot", "true", b'{"client_params": {"id": "a\\nb", "group": "default"}}', "invalid_client_id"),
    ("/v1/pre-reboot", "true", b'{"client_params": {"id": "n1", "group": "a b"}}', "invalid_group"),
    ("/v1/pre-reboot", "true", b'{"client_params": {"id": "n1"}}', "invalid_group"),
    ("/v1/steady-state", "true", b"x" * 5000, "body_too_large"),
])
def test_requests_outside_the_protocol_are_refused_with_a_kind(path: str, header: str | None, body: bytes,
                                                                kind: str) -> None:
    result = parse_request(path, header, body)
    assert isinstance(result, Rejection) and result.kind == kind, result
    assert 400 <= result.status < 500
    doc = json.loads(result.body())
    assert set(doc) == {"kind", "value"} and doc["kind"] == kind and doc["value"]


@pytest.mark.parametrize(("path", "operation"), [("/v1/pre-reboot", "pre-reboot"),
                                                 ("/v1/steady-state/", "steady-state")])
def test_a_protocol_request_is_taken_with_its_client(path: str, operation: str) -> None:
    result = parse_request(path, "true", BODY)
    assert result == Request(operation, "c988d2509fdf4cdcbed39037c56406fb", "default", BODY)


@given(path=st.text(max_size=40), header=st.one_of(st.none(), st.text(max_size=10)), body=st.binary(max_size=600))
def test_any_request_is_answered_never_raised(path: str, header: str | None, body: bytes) -> None:
    result = parse_request(path, header, body)
    if isinstance(result, Request):
        assert result.operation in ("pre-reboot", "steady-state") and result.client_id and result.group
    else:
        assert result.status in (400, 404, 413) and result.kind


@given(params=st.dictionaries(st.sampled_from(["id", "group", "node_uuid"]),
                              st.one_of(st.text(max_size=20), st.integers(), st.none())))
def test_generated_client_params_are_taken_only_when_valid(params: dict[str, Any]) -> None:
    result = parse_request("/v1/pre-reboot", "true", json.dumps({"client_params": params}).encode())
    valid = isinstance(params.get("id"), str) and params["id"] and params["id"].isprintable() \
        and isinstance(params.get("group"), str) and bool(params["group"]) \
        and all(c.isascii() and (c.isalnum() or c in ".-") for c in params["group"])
    assert isinstance(result, Request) == bool(valid), (params, result)


# --- decisions

UE = "update_engine"


@pytest.mark.parametrize(("agent", "next_boot", "told", "expected"), [
    (("ready", False), STAGED, (UE, True), (True, False, None)),
    (("ready", False), MISSING, (UE, True), (False, False, "nvidia_driver_missing")),
    (("ready", False), {**MISSING, "state": "staging"}, (UE, True), (False, False, "nvidia_driver_staging")),
    (("ready", False), {**MISSING, "state": "failed"}, (UE, True), (False, False, "nvidia_driver_failed")),
    (("ready", False), None, (UE, True), (False, False, "nvidia_next_boot_unknown")),  # the poll may lag the updater
    (("starting", False), None, (UE, False), (False, False, "nvidia_next_boot_unknown")),  # not looked yet
    (("detecting", False), STAGED, (UE, True), (True, False, None)),  # mid-pass: the last pass's word stands
    (("detecting", False), MISSING, (UE, True), (False, False, "nvidia_driver_missing")),
    (("degraded", True), MISSING, (UE, True), (False, False, "nvidia_driver_missing")),  # serving: a driver works now
    (("degraded", False), MISSING, (UE, True), (True, True, None)),  # nothing works now: waiting protects nothing
    (("failed", False), None, (UE, True), (True, True, None)),
    (("no-gpu", False), None, (UE, True), (True, False, None)),
    (("ready", False), None, ("none", True), (True, True, None)),  # no updater watched: the next boot is unknown
    (("ready", False), None, ("kernel-postinst", True), (True, False, None)),  # no hook said a new kernel comes
    (("starting", False), None, ("kernel-postinst", False), (False, False, "nvidia_next_boot_unknown")),
    (("ready", False), MISSING, ("kernel-postinst", True), (False, False, "nvidia_driver_missing")),
])
def test_decide(agent: tuple[str, bool], next_boot: dict[str, str] | None, told: tuple[str, bool],
                expected: tuple[bool, bool, str | None]) -> None:
    (phase, serving), (source, looked), (grant, warning, kind) = agent, told, expected
    verdict = decide(phase, serving, next_boot, source=source, looked=looked, hold=None, now=1000.0,
                     hold_max_s=600)
    assert (verdict.grant, verdict.warning) == (grant, warning), verdict
    assert (verdict.refusal.kind if verdict.refusal else None) == kind
    if not grant:
        assert verdict.refusal is not None and verdict.refusal.status == 409
        assert verdict.hold == Hold(next_boot["os_key"] if next_boot else "?", 1000.0)
    else:
        assert verdict.hold is None, "nothing was held"


def refused_at(now: float, hold: Hold | None, next_boot: dict[str, str] | None = MISSING) -> Any:
    return decide("ready", False, next_boot, source=UE, looked=True, hold=hold, now=now, hold_max_s=600)


def test_the_hold_is_bounded_and_stays_run_out() -> None:
    hold = Hold(MISSING["os_key"], 1000.0)
    still = refused_at(1599.0, hold)
    assert not still.grant and still.hold == hold and "held 599s of 600s" in still.reason
    opened = refused_at(1600.0, hold)
    assert opened.grant and opened.warning and opened.hold == hold and "hold_max_s" in opened.reason
    later = refused_at(1660.0, opened.hold)
    assert later.grant and later.warning, "once run out, the hold never refuses again (the fleet's slot may be busy)"
    staged = decide("ready", False, STAGED, source=UE, looked=True, hold=hold, now=1700.0, hold_max_s=600)
    assert staged.grant and not staged.warning and staged.hold is None, "staged: the hold is over"


def test_another_next_boot_holds_anew_and_an_unknown_one_does_not() -> None:
    hold = Hold(MISSING["os_key"], 1000.0)
    other = refused_at(1500.0, hold, {**MISSING, "os_key": "flatcar-3139.2.2-6.1.0-30-amd64"})
    assert not other.grant and other.hold == Hold("flatcar-3139.2.2-6.1.0-30-amd64", 1500.0)
    blip = refused_at(1500.0, hold, {**MISSING, "state": "failed", "os_key": "?"})
    assert blip.hold == hold, "an updater error (next boot '?') does not restart the clock"
    named = refused_at(1500.0, Hold("?", 900.0))
    assert named.hold == Hold(MISSING["os_key"], 900.0), "the same episode, now named"
    assert refused_at(0.0, None).grant is False
    assert decide("ready", False, MISSING, source=UE, looked=True, hold=None, now=0.0, hold_max_s=0).grant, \
        "hold_max_s = 0: the gate never holds"


# --- addresses

@pytest.mark.parametrize(("value", "parsed"), [("127.0.0.1:9797", ("127.0.0.1", 9797)),
                                               ("127.0.0.53:1", ("127.0.0.53", 1)),
                                               ("[::1]:9797", ("::1", 9797))])
def test_the_gate_listens_on_loopback(value: str, parsed: tuple[str, int]) -> None:
    assert parse_listen(value) == parsed


@pytest.mark.parametrize("value", ["0.0.0.0:9797", "[::]:9797", "10.0.0.1:9797", "localhost:9797",
                                   "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:x", ":9797"])
def test_the_gate_refuses_any_other_address(value: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        parse_listen(value)


@pytest.mark.parametrize(("base", "url"), [("http://lock.example/", "http://lock.example/v1/pre-reboot"),
                                           ("http://lock.example/base", "http://lock.example/base/v1/pre-reboot"),
                                           ("https://l.example:8443/a/", "https://l.example:8443/a/v1/pre-reboot")])
def test_upstream_endpoints_are_under_the_base_url(base: str, url: str) -> None:
    assert upstream_url(base, "pre-reboot") == url


# --- over HTTP

class FleetLockServer:
    """A FleetLock server as the spec describes it: a counting semaphore of `slots` with owned,
    recursive locks; pre-reboot takes a slot (or refuses, semaphore full), steady-state releases."""

    def __init__(self, slots: int = 1) -> None:
        self.slots = slots
        self.holders: set[str] = set()
        self.requests: list[tuple[str, dict[str, Any], str | None]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                doc = json.loads(body)
                server.requests.append((self.path, doc, self.headers.get("fleet-lock-protocol")))
                node = doc["client_params"]["id"]
                status, reply = 200, b""
                if self.path.endswith("/v1/pre-reboot"):
                    if node not in server.holders and len(server.holders) >= server.slots:
                        status = 409
                        reply = json.dumps({"kind": "failed_lock_semaphore_full",
                                            "value": "semaphore currently full, all slots are locked already"}).encode()
                    else:
                        server.holders.add(node)
                else:
                    server.holders.discard(node)
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fleet/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FleetLockServer:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Zincati:
    """The client side as Zincati's fleet_lock module sends it: POST base + v1/<op>, the pretty JSON
    body of client_params, header fleet-lock-protocol: true; 200 grants, else {kind, value}."""

    def __init__(self, base: str, node: str = "c988d2509fdf4cdcbed39037c56406fb") -> None:
        self.base = base
        self.body = json.dumps({"client_params": {"id": node, "group": "default"}}, indent=2)

    def _post(self, op: str) -> tuple[bool, dict[str, Any]]:
        reply = requests.post(upstream_url(self.base, op), data=self.body, timeout=30,
                              headers={"fleet-lock-protocol": "true"})
        return reply.status_code == 200, (reply.json() if reply.status_code != 200 else {})

    def pre_reboot(self) -> tuple[bool, dict[str, Any]]:
        return self._post("pre-reboot")

    def steady_state(self) -> tuple[bool, dict[str, Any]]:
        return self._post("steady-state")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(port: int, tmp_path: Path, snap: dict[str, Snapshot], clock: Clock, *, upstream: str = "",
          hold_max_s: float = 600) -> RebootGate:
    pokes = tmp_path / "pokes"

    def poke() -> None:
        pokes.write_text(str(int(pokes.read_text() or "0") + 1) if pokes.exists() else "1")

    gate = RebootGate(f"127.0.0.1:{port}", upstream, hold_max_s=hold_max_s, snapshot=lambda: snap["now"],
                      source="update_engine", looked=lambda: True, poke=poke, hold_file=tmp_path / "run/gate-hold.json",
                      clock=clock)
    gate.start()
    return gate


@pytest.fixture
def gate_parts(port: int, tmp_path: Path) -> Iterator[tuple[dict[str, Snapshot], Clock, Zincati]]:
    snap = {"now": Snapshot(phase=Phase.READY, next_boot=MISSING)}
    clock = Clock()
    gate = serve(port, tmp_path, snap, clock)
    try:
        yield snap, clock, Zincati(f"http://127.0.0.1:{port}")
    finally:
        gate.stop()


def test_zincati_is_refused_until_the_driver_is_staged(gate_parts: tuple[dict[str, Snapshot], Clock, Zincati]) -> None:
    snap, clock, zincati = gate_parts
    assert zincati.steady_state() == (True, {}), "steady-state: the gate holds no slot"
    granted, error = zincati.pre_reboot()
    assert not granted and error["kind"] == "nvidia_driver_missing" and "404" in error["value"]
    clock.now += 60
    snap["now"] = snap["now"].evolve(next_boot={**MISSING, "state": "staging"})
    granted, error = zincati.pre_reboot()
    assert not granted and error["kind"] == "nvidia_driver_staging" and "held 60s" in error["value"]
    snap["now"] = snap["now"].evolve(next_boot=STAGED)
    assert zincati.pre_reboot() == (True, {})


def test_the_hold_ends_after_hold_max_s_with_a_warning(gate_parts: tuple[dict[str, Snapshot], Clock, Zincati],
                                                       tmp_path: Path) -> None:
    from structlog.testing import capture_logs  # noqa: PLC0415

    _, clock, zincati = gate_parts
    assert not zincati.pre_reboot()[0]
    assert json.loads((tmp_path / "run/gate-hold.json").read_text())["os_key"] == MISSING["os_key"]
    clock.now += 599
    assert not zincati.pre_reboot()[0]
    clock.now += 1
    with capture_logs() as logs:
        assert zincati.pre_reboot() == (True, {})
    granted = [e for e in logs if e["event"] == "gate_granted"]
    assert granted and granted[0]["log_level"] == "warning" and "hold_max_s" in granted[0]["reason"]
    clock.now += 3600
    assert zincati.pre_reboot() == (True, {}), "run out stays run out"
    assert json.loads((tmp_path / "run/gate-hold.json").read_text())["since"] == 1000.0


def test_the_hold_survives_an_agent_restart(port: int, tmp_path: Path) -> None:
    snap = {"now": Snapshot(phase=Phase.READY, next_boot=MISSING)}
    clock = Clock()
    zincati = Zincati(f"http://127.0.0.1:{port}")
    gate = serve(port, tmp_path, snap, clock)
    try:
        assert not zincati.pre_reboot()[0]
    finally:
        gate.stop()
    clock.now += 600
    gate = serve(port, tmp_path, snap, clock)  # a restarted agent: the clock did not start again
    try:
        assert zincati.pre_reboot()[0]
    finally:
        gate.stop()


def test_an_unknown_next_boot_asks_for_a_pass(gate_parts: tuple[dict[str, Snapshot], Clock, Zincati],
                                              tmp_path: Path) -> None:
    snap, _, zincati = gate_parts
    snap["now"] = snap["now"].evolve(next_boot=None)
    granted, error = zincati.pre_reboot()
    assert not granted and error["kind"] == "nvidia_next_boot_unknown"
    assert (tmp_path / "pokes").read_text() == "1", "the agent looks at the updater at once"


def test_requests_outside_the_protocol_over_http(gate_parts: tuple[dict[str, Snapshot], Clock, Zincati]) -> None:
    _, _, zincati = gate_parts
    base = zincati.base
    no_header = requests.post(base + "/v1/pre-reboot", data=zincati.body, timeout=10)
    assert no_header.status_code == 400 and no_header.json()["kind"] == "missing_protocol_header"
    get = requests.get(base + "/v1/pre-reboot", timeout=10)
    assert get.status_code == 405 and get.json()["kind"] == "method_not_allowed"
    big = requests.post(base + "/v1/pre-reboot", data=b"x" * 10000, timeout=10,
                        headers={"fleet-lock-protocol": "true"})
    assert big.status_code == 413
    assert zincati.steady_state()[0], "the gate still serves after bad requests"


def test_granted_requests_go_to_the_fleets_lock_server(port: int, tmp_path: Path) -> None:
    snap = {"now": Snapshot(phase=Phase.READY, next_boot=MISSING)}
    with FleetLockServer(slots=1) as fleet:
        fleet.holders.add("another-node")  # the fleet's one slot is taken
        gate = serve(port, tmp_path, snap, Clock(), upstream=fleet.url)
        try:
            zincati = Zincati(f"http://127.0.0.1:{port}")
            granted, error = zincati.pre_reboot()
            assert not granted and error["kind"] == "nvidia_driver_missing"
            assert fleet.requests == [], "refused here: the fleet's slot is not asked for (nor held)"
            snap["now"] = snap["now"].evolve(next_boot=STAGED)
            granted, error = zincati.pre_reboot()
            assert not granted and error == {"kind": "failed_lock_semaphore_full",
                                             "value": "semaphore currently full, all slots are locked already"}
            fleet.holders.clear()
            assert zincati.pre_reboot() == (True, {})
            assert fleet.holders == {"c988d2509fdf4cdcbed39037c56406fb"}
            assert zincati.steady_state() == (True, {})
            assert fleet.holders == set(), "steady-state releases the fleet's slot"
            paths = [(p, header) for p, _, header in fleet.requests]
            assert paths == [("/fleet/v1/pre-reboot", "true")] * 2 + [("/fleet/v1/steady-state", "true")]
            assert all(doc == json.loads(zincati.body) for _, doc, _ in fleet.requests), "forwarded as sent"
        finally:
            gate.stop()


def test_an_unreachable_fleet_server_refuses(port: int, tmp_path: Path) -> None:
    import socket  # noqa: PLC0415

    snap = {"now": Snapshot(phase=Phase.READY, next_boot=STAGED)}
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: a connection is refused
    gate = serve(port, tmp_path, snap, Clock(), upstream=f"http://127.0.0.1:{closed.getsockname()[1]}/")
    try:
        granted, error = Zincati(f"http://127.0.0.1:{port}").pre_reboot()
        assert not granted and error["kind"] == "upstream_unreachable"
        assert gate.view()["last"]["granted"] is False
    finally:
        gate.stop()
        closed.close()


def test_a_taken_port_is_a_clear_error(port: int, tmp_path: Path) -> None:
    from agent.errors import HostError  # noqa: PLC0415

    snap = {"now": Snapshot(phase=Phase.READY)}
    first = serve(port, tmp_path, snap, Clock())
    try:
        with pytest.raises(HostError, match=f"cannot listen on 127.0.0.1:{port}") as err:
            serve(port, tmp_path, snap, Clock())
        assert err.value.hint and "update.gate_listen" in err.value.hint
    finally:
        first.stop()


def test_a_slow_client_holds_only_its_own_slot_and_not_the_stop(port: int, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that sends a byte now and then (each read within the per-read timeout) is cut off
    at the request's deadline; meanwhile others are answered, and stopping the gate never waits."""
    import socket  # noqa: PLC0415
    import time  # noqa: PLC0415

    from agent import httpserve  # noqa: PLC0415

    monkeypatch.setattr(httpserve, "REQUEST_DEADLINE_S", 2.0)
    snap = {"now": Snapshot(phase=Phase.READY, next_boot=STAGED)}
    gate = serve(port, tmp_path, snap, Clock())
    slow = socket.create_connection(("127.0.0.1", port))
    try:
        slow.sendall(b"POST /v1/pre-reboot HTTP/1.1\r\n")
        started = time.monotonic()
        assert Zincati(f"http://127.0.0.1:{port}").pre_reboot() == (True, {})
        assert time.monotonic() - started < 2, "another client waited for the slow one"
        cut_off = False
        for _ in range(8):  # one header byte a second: each read is on time, the whole is not
            try:
                slow.sendall(b"X")
                time.sleep(1)
                if slow.recv(1, socket.MSG_DONTWAIT) == b"":
                    cut_off = True
                    break
            except BlockingIOError:
                continue
            except OSError:
                cut_off = True
                break
        assert cut_off, "the slow client was never cut off"
        started = time.monotonic()
        gate.stop()
        assert time.monotonic() - started < 2
    finally:
        slow.close()


def test_a_fleet_server_answering_other_than_200_or_an_error_refuses(port: int, tmp_path: Path) -> None:
    class Odd(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    odd = ThreadingHTTPServer(("127.0.0.1", 0), Odd)
    threading.Thread(target=odd.serve_forever, daemon=True).start()
    snap = {"now": Snapshot(phase=Phase.READY, next_boot=STAGED)}
    gate = serve(port, tmp_path, snap, Clock(), upstream=f"http://127.0.0.1:{odd.server_address[1]}/")
    try:
        granted, error = Zincati(f"http://127.0.0.1:{port}").pre_reboot()
        assert not granted and error["kind"] == "upstream_unexpected_status" and "204" in error["value"]
    finally:
        gate.stop()
        odd.shutdown()
        odd.server_close()
