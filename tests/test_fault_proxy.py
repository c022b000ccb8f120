"""The fault-injecting proxy against the real registry: each fault is exactly what a plain client sees."""

from __future__ import annotations

import http.client
import os
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import requests

from support.flaky_proxy import NO_ANSWER, Fault, FaultKind, FlakyProxy, Seen, always, blobs, manifests
from support.registry import RegistryServer

pytestmark = pytest.mark.integration

REPO = "fault/proxy"
BLOB = os.urandom(64 * 1024)
BIG_BLOB = os.urandom(1024 * 1024)  # more than loopback buffers take before the client reads
CLIENT_TIMEOUT_S = 10.0
READ_BYTES = 4096


@pytest.fixture(scope="module")
def blob_path(registry_server: RegistryServer) -> str:
    """The registry path of BLOB, pushed once for the module."""
    return f"/v2/{REPO}/blobs/{registry_server.pusher.push_blob(REPO, BLOB)}"


@pytest.fixture(scope="module")
def big_blob_path(registry_server: RegistryServer) -> str:
    """The registry path of BIG_BLOB, pushed once for the module."""
    return f"/v2/{REPO}/blobs/{registry_server.pusher.push_blob(REPO, BIG_BLOB)}"


@pytest.fixture
def proxy(registry_server: RegistryServer) -> Iterator[FlakyProxy]:
    """A proxy in front of the session registry that forwards everything until a test plans faults."""
    with FlakyProxy(registry_server.host) as running:
        yield running


def get(proxy: FlakyProxy, path: str, *, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    """A GET through `proxy` with http.client, returning the response with its body unread."""
    conn = http.client.HTTPConnection(proxy.host, timeout=CLIENT_TIMEOUT_S)
    conn.request("GET", path, headers=headers or {})
    return conn.getresponse()


def read_until_broken(resp: http.client.HTTPResponse) -> tuple[bytes, OSError | None]:
    """Every body byte that arrived, and the socket error that ended the body (None for a clean EOF)."""
    got = bytearray()
    try:
        while chunk := resp.read1(READ_BYTES):
            got += chunk
    except OSError as exc:
        return bytes(got), exc
    return bytes(got), None


def address_of(proxy: FlakyProxy) -> tuple[str, int]:
    host, port = proxy.host.rsplit(":", 1)
    return host, int(port)


def last(proxy: FlakyProxy) -> Seen:
    return proxy.seen[-1]


# --- forwarding and Range ------------------------------------------------------------------------


def test_registry_serves_ranges_on_blobs(registry_server: RegistryServer, blob_path: str) -> None:
    """Debian's docker-registry itself answers a blob Range with 206 and Content-Range, suffix forms too."""
    url = registry_server.url + blob_path
    for spec, start, end in [("bytes=10-19", 10, 19), ("bytes=65530-", 65530, 65535), ("bytes=-6", 65530, 65535)]:
        resp = requests.get(url, headers={"Range": spec}, timeout=CLIENT_TIMEOUT_S)
        assert resp.status_code == 206, spec
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert resp.headers["Content-Range"] == f"bytes {start}-{end}/{len(BLOB)}"
        assert resp.content == BLOB[start : end + 1]
    with requests.get(url, headers={"Range": "bytes=70000-"}, timeout=CLIENT_TIMEOUT_S, stream=True) as past_end:
        assert past_end.status_code == 416  # (its Content-Length is the blob's, its body a short text: read no body)
        assert past_end.headers["Content-Range"] == f"bytes */{len(BLOB)}"


def test_forward_is_faithful(proxy: FlakyProxy, blob_path: str) -> None:
    """Without faults a blob comes through whole and is recorded with every byte sent."""
    resp = get(proxy, blob_path)
    assert (resp.status, resp.read()) == (200, BLOB)
    assert last(proxy) == Seen("GET", blob_path, 200, None, None, len(BLOB), None)


def test_range_is_passed_through_and_recorded(proxy: FlakyProxy, blob_path: str) -> None:
    """A client's Range reaches the registry; its 206, Content-Range and slice come back; seen keeps the Range."""
    resp = get(proxy, blob_path, headers={"Range": "bytes=1000-1999"})
    assert resp.status == 206
    assert resp.getheader("Content-Range") == f"bytes 1000-1999/{len(BLOB)}"
    assert resp.read() == BLOB[1000:2000]
    assert last(proxy) == Seen("GET", blob_path, 206, None, "bytes=1000-1999", 1000, None)


# --- faults --------------------------------------------------------------------------------------


def test_reset_aborts_after_n_bytes(proxy: FlakyProxy, blob_path: str) -> None:
    """A reset hands over the headers and exactly N body bytes, then the client reads ECONNRESET, not EOF."""
    proxy.plan(Fault.reset(1000, when=blobs, times=2))
    resp = get(proxy, blob_path)
    assert (resp.status, resp.getheader("Content-Length")) == (200, str(len(BLOB)))
    body, error = read_until_broken(resp)
    assert body == BLOB[:1000]
    assert isinstance(error, ConnectionResetError)
    with pytest.raises(requests.exceptions.ChunkedEncodingError, match="Connection reset"):
        requests.get(proxy.url + blob_path, timeout=CLIENT_TIMEOUT_S)
    assert get(proxy, blob_path).read() == BLOB  # two turns used: healthy again
    assert [(s.fault, s.sent_bytes) for s in proxy.seen] == [("reset", 1000), ("reset", 1000), (None, len(BLOB))]


def test_reset_waits_for_a_slow_reader_to_take_its_bytes(proxy: FlakyProxy, big_blob_path: str) -> None:
    """A client that reads late still gets all N bytes before the reset (the RST does not discard them)."""
    owed = 768 * 1024
    proxy.plan(Fault.reset(owed))
    resp = get(proxy, big_blob_path)
    time.sleep(0.2)  # the proxy has written all it may; most of it still waits in its send queue
    body, error = read_until_broken(resp)
    assert (len(body), body == BIG_BLOB[:owed], type(error)) == (owed, True, ConnectionResetError)


def test_truncate_closes_cleanly_after_n_bytes(proxy: FlakyProxy, blob_path: str) -> None:
    """A truncation announces the full length, sends N bytes and ends with a clean EOF (no reset)."""
    proxy.plan(Fault.truncate(1000, when=blobs, times=1))
    resp = get(proxy, blob_path)
    assert resp.getheader("Content-Length") == str(len(BLOB))
    assert read_until_broken(resp) == (BLOB[:1000], None)
    assert get(proxy, blob_path).read() == BLOB  # its one turn is used
    assert [(s.fault, s.sent_bytes) for s in proxy.seen] == [("truncate", 1000), (None, len(BLOB))]


def test_truncate_defaults_to_half_the_body(proxy: FlakyProxy, blob_path: str) -> None:
    """Without a byte count a truncation (the old cut_first) stops halfway, as http.client reports."""
    proxy.plan(Fault.truncate(when=blobs))
    with pytest.raises(http.client.IncompleteRead) as info:
        get(proxy, blob_path).read()
    assert info.value.partial == BLOB[: len(BLOB) // 2]
    assert info.value.expected == len(BLOB) - len(BLOB) // 2
    assert last(proxy).sent_bytes == len(BLOB) // 2


@pytest.mark.parametrize(
    ("fault", "size"),
    [(Fault.drip(bytes_per_s=4000), 1200), (Fault.drip(every_s=0.01), 30)],
    ids=["bytes_per_s", "every_s"],
)
def test_drip_paces_a_correct_body(proxy: FlakyProxy, blob_path: str, fault: Fault, size: int) -> None:
    """A drip takes at least size / rate seconds and delivers exactly the bytes asked for."""
    proxy.plan(fault)
    started = time.monotonic()
    resp = get(proxy, blob_path, headers={"Range": f"bytes=0-{size - 1}"})
    body = resp.read()
    elapsed = time.monotonic() - started
    assert body == BLOB[:size]
    assert elapsed >= size / fault.bytes_per_s
    assert (last(proxy).status, last(proxy).fault, last(proxy).sent_bytes) == (206, "drip", size)


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_storm_answers_n_statuses_then_recovers(proxy: FlakyProxy, blob_path: str, status: int) -> None:
    """A storm answers its status with Retry-After to the first N matching requests; then the blob is served."""
    proxy.plan(Fault.storm(status, retry_after=2, when=blobs, times=2))
    answers = [requests.get(proxy.url + blob_path, timeout=CLIENT_TIMEOUT_S) for _ in range(3)]
    assert [r.status_code for r in answers] == [status, status, 200]
    assert [r.headers.get("Retry-After") for r in answers] == ["2", "2", None]
    assert answers[0].json()["errors"][0]["code"] == "UNAVAILABLE"
    assert answers[2].content == BLOB
    assert [s.status for s in proxy.seen] == [status, status, 200]


def test_blackhole_times_out_until_healed(proxy: FlakyProxy, blob_path: str) -> None:
    """A blackholed request gets no answer (client read timeout); after plan() heals it, the blob is served."""
    proxy.plan(Fault.blackhole(when=blobs))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(proxy.url + blob_path, timeout=0.3)
    assert last(proxy) == Seen("GET", blob_path, NO_ANSWER, None, None, 0, FaultKind.BLACKHOLE)
    proxy.plan()
    assert requests.get(proxy.url + blob_path, timeout=CLIENT_TIMEOUT_S).content == BLOB


def test_exit_wakes_a_blackholed_handler_and_leaks_nothing(registry_server: RegistryServer, blob_path: str) -> None:
    """__exit__ cuts a connection held by a blackhole at once, joins its thread and closes the port."""
    threads_before = set(threading.enumerate())
    with FlakyProxy(registry_server.host, faults=(Fault.blackhole(),)) as proxy:
        address = address_of(proxy)
        client = socket.create_connection(address, timeout=CLIENT_TIMEOUT_S)
        client.sendall(f"GET {blob_path} HTTP/1.1\r\nHost: {proxy.host}\r\n\r\n".encode())
        deadline = time.monotonic() + CLIENT_TIMEOUT_S
        while not proxy.seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proxy.count() == 1  # the handler is parked in the blackhole now
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 2.0  # not the STOP_TIMEOUT_S a stuck handler would cost
    with client:
        assert client.recv(1) == b""  # closed by the proxy, without a byte of answer
    assert set(threading.enumerate()) <= threads_before
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=CLIENT_TIMEOUT_S)


def test_corrupt_flips_one_byte_at_the_offset(proxy: FlakyProxy, blob_path: str) -> None:
    """A corruption keeps the length and changes exactly the byte at the offset (only a digest notices)."""
    proxy.plan(Fault.corrupt(40_000, when=blobs))
    resp = get(proxy, blob_path)
    body = resp.read()
    assert len(body) == int(resp.getheader("Content-Length") or 0) == len(BLOB)
    assert [i for i, (a, b) in enumerate(zip(body, BLOB, strict=True)) if a != b] == [40_000]
    assert body[40_000] == BLOB[40_000] ^ 0xFF


# --- the plan ------------------------------------------------------------------------------------


def test_first_matching_fault_with_turns_left_decides(proxy: FlakyProxy, blob_path: str) -> None:
    """A forward line ahead spares the first request; a predicate that does not match leaves others alone."""
    proxy.plan(Fault.forward(when=blobs, times=1), Fault.storm(500, when=blobs), Fault.storm(502, when=manifests))
    statuses = [requests.get(proxy.url + blob_path, timeout=CLIENT_TIMEOUT_S).status_code for _ in range(3)]
    assert statuses == [200, 500, 500]
    assert requests.get(f"{proxy.url}/v2/", timeout=CLIENT_TIMEOUT_S).status_code == 200
    assert [s.fault for s in proxy.seen] == ["forward", "storm", "storm", None]


def test_body_faults_spare_answers_without_a_body(proxy: FlakyProxy, blob_path: str) -> None:
    """A 404 and a HEAD pass through a body fault untouched and do not use its turn; the next 200 is cut."""
    proxy.plan(Fault.reset(0, when=blobs, times=1))
    missing = requests.get(f"{proxy.url}/v2/{REPO}/blobs/sha256:{'0' * 64}", timeout=CLIENT_TIMEOUT_S)
    assert missing.status_code == 404
    assert missing.json()["errors"][0]["code"] == "BLOB_UNKNOWN"
    assert requests.head(proxy.url + blob_path, timeout=CLIENT_TIMEOUT_S).headers["Content-Length"] == str(len(BLOB))
    body, error = read_until_broken(get(proxy, blob_path))
    assert (body, type(error)) == (b"", ConnectionResetError)
    assert [s.fault for s in proxy.seen] == [None, None, "reset"]


def test_old_flags_build_the_same_plan(registry_server: RegistryServer) -> None:
    """FlakyProxy's old flags become a storm, a half truncation and an endless corruption, in that order."""
    with FlakyProxy(
        registry_server.host, fail_first=2, fail_status=429, fail_headers={"Retry-After": "3"},
        cut_first=1, corrupt_when=manifests,
    ) as proxy:
        assert proxy.faults == (
            Fault(FaultKind.STORM, always, 2, status=429, headers=(("Retry-After", "3"),)),
            Fault(FaultKind.TRUNCATE, blobs, 1),
            Fault(FaultKind.CORRUPT, manifests, None, offset=0),
        )
