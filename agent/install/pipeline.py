"""Threads that let one layer's extraction use every core: inflate ahead, hash behind.

Extracting a layer is three kinds of work on the same bytes: inflating them (ISA-L), parsing
and writing them (the tar reader, the filesystem), and hashing them twice (the layer's diff_id,
each file's digest). ISA-L and hashlib release the GIL, so each runs in a thread of its own:
`Prefetch` inflates up to `depth` chunks ahead of the reader, `HashWorker` feeds sha256 objects
in the order the bytes were read. Both are bounded (a few MiB in flight) and hand exceptions to
the thread that asked. Closed, they stop: `HashWorker` at once, `Prefetch` once the read under way
returns (its `interrupt` is called first, to wake a read that waits for bytes: agent.install.layers).
"""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
from collections.abc import Callable
from typing import Any

QUEUE_WAIT_S = 0.05  # a blocked thread looks this often whether it was told to stop
_END = object()


class Prefetch:
    """`read(chunk)` of a stream, run ahead in a thread; `read()` here hands the chunks out in order."""

    def __init__(self, read: Callable[[int], bytes], *, chunk: int, depth: int = 4, name: str = "prefetch",
                 interrupt: Callable[[], None] = lambda: None) -> None:
        self._read = read
        self._interrupt = interrupt
        self._chunk = chunk
        self._queue: queue.Queue[Any] = queue.Queue(depth)
        self._stop = threading.Event()
        self._ended = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data: Any = self._read(self._chunk)
            except BaseException as exc:  # handed to the reader, raised there
                data = exc
            if not self._put(data) or isinstance(data, BaseException) or not data:
                return

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=QUEUE_WAIT_S)
                return True
            except queue.Full:
                continue
        return False

    def read(self, _size: int = -1) -> bytes:
        """The next chunk (whatever its size), b"" at the end; what the stream raised, raised here."""
        if self._ended:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if not item:
            self._ended = True
        return bytes(item)

    def close(self) -> None:
        """Stop the thread (it may finish the chunk it is reading) and wait for it."""
        self._stop.set()
        if not self._ended:  # the reader gave up early: a read may be waiting for bytes that are not needed now
            self._interrupt()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                while True:  # room for a put that is under way: it wakes, sees the stop and ends
                    self._queue.get_nowait()
            self._thread.join(QUEUE_WAIT_S)
        self._ended = True


class HashWorker:
    """sha256 updates in a thread of their own, in submission order. Thread-safe for one submitter."""

    def __init__(self, *, depth: int = 4, name: str = "hash") -> None:
        self._queue: queue.Queue[Any] = queue.Queue(depth)  # items hold views of chunks: a few MiB at most
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _END:
                    return
                target, data = item
                if data is None:
                    target.set()  # a barrier: everything before it was hashed
                elif self._error is None:
                    target.update(data)
            except BaseException as exc:  # a bug: drain() raises it, the thread keeps emptying the queue
                self._error = exc
            finally:
                self._queue.task_done()

    def update(self, digest: Any, data: bytes | memoryview) -> None:
        """digest.update(data), later. `data` must not change afterwards (bytes, or a view of bytes)."""
        self._queue.put((digest, data))

    def drain(self) -> None:
        """Return once everything submitted so far was hashed."""
        if not self._thread.is_alive():
            if self._error is not None:
                raise self._error
            return
        done = threading.Event()
        self._queue.put((done, None))
        done.wait()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_END)
            self._thread.join()


class StreamHash:
    """A sha256 of a stream whose updates go through a HashWorker (tar.Hasher); read it after drain()."""

    def __init__(self, worker: HashWorker) -> None:
        self._worker = worker
        self.digest = hashlib.sha256()

    def update(self, data: bytes | memoryview, /) -> None:
        self._worker.update(self.digest, data)
