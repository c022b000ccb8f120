"""The extraction's threads (agent/install/pipeline.py): order, errors, and stopping whatever they do."""

from __future__ import annotations

import hashlib
import io
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import ImageRejected
from agent.install.pipeline import HashWorker, Prefetch, StreamHash


@given(st.lists(st.binary(max_size=300), max_size=40), st.integers(1, 64), st.integers(1, 5))
@settings(max_examples=200, deadline=None)
def test_prefetch_hands_out_the_stream_in_order(chunks: list[bytes], size: int, depth: int) -> None:
    data = b"".join(chunks)
    ahead = Prefetch(io.BytesIO(data).read, chunk=size, depth=depth)
    got = []
    while piece := ahead.read():
        got.append(piece)
    ahead.close()
    assert b"".join(got) == data
    assert ahead.read() == b""


def test_an_error_of_the_stream_is_raised_to_the_reader_after_what_came_before() -> None:
    pieces = iter([b"one", b"two"])

    def read(_n: int) -> bytes:
        piece = next(pieces, None)
        if piece is None:
            raise ImageRejected("layer x is not a valid gzip stream: invalid block type")
        return piece

    ahead = Prefetch(read, chunk=3)
    assert ahead.read() + ahead.read() == b"onetwo"
    with pytest.raises(ImageRejected, match="invalid block type"):
        ahead.read()
    assert ahead.read() == b""  # and nothing after it
    ahead.close()


def test_close_stops_a_thread_blocked_on_a_full_queue_at_once() -> None:
    reads = []

    def endless(n: int) -> bytes:
        reads.append(n)
        return b"x" * n

    ahead = Prefetch(endless, chunk=1 << 10, depth=2)
    deadline = time.monotonic() + 5
    while len(reads) < 3 and time.monotonic() < deadline:  # two queued, the third waits for room
        time.sleep(0.001)
    started = time.monotonic()
    ahead.close()
    assert time.monotonic() - started < 1.0
    assert not any(t.name == "prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(reads) <= 4  # it stopped reading: no runaway inflate after the reader gave up


def test_interrupt_wakes_a_read_only_when_the_reader_gave_up_early() -> None:
    """A read waiting for bytes (a download followed as it arrives) is woken through `interrupt` when the
    reader abandons the stream; a stream read to its end is closed without it."""
    woken = threading.Event()

    def waits(_n: int) -> bytes:
        if not woken.wait(5):
            return b"late"
        raise ImageRejected("interrupted")

    ahead = Prefetch(waits, chunk=4, interrupt=woken.set)
    started = time.monotonic()
    ahead.close()
    assert woken.is_set() and time.monotonic() - started < 1.0
    whole = Prefetch(io.BytesIO(b"abc").read, chunk=2, interrupt=lambda: pytest.fail("interrupted a full read"))
    while whole.read():
        pass
    whole.close()


@given(st.lists(st.tuples(st.integers(0, 2), st.binary(max_size=200)), max_size=60))
@settings(max_examples=200, deadline=None)
def test_hashes_in_the_thread_equal_hashes_in_order(updates: list[tuple[int, bytes]]) -> None:
    worker = HashWorker(depth=3)
    streams = [StreamHash(worker) for _ in range(3)]
    plain = [hashlib.sha256() for _ in range(3)]
    for which, data in updates:
        streams[which].update(memoryview(data))
        plain[which].update(data)
    worker.drain()
    assert [s.digest.hexdigest() for s in streams] == [p.hexdigest() for p in plain]
    worker.close()


def test_drain_raises_what_went_wrong_in_the_hash_thread() -> None:
    worker = HashWorker()

    class Broken:
        def update(self, _data: bytes) -> None:
            raise RuntimeError("a bug")

    worker.update(Broken(), b"x")
    worker.update(hashlib.sha256(), b"y")  # the thread goes on taking work: nothing blocks on it
    with pytest.raises(RuntimeError, match="a bug"):
        worker.drain()
    worker.close()
