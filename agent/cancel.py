"""The stop request as long-running work sees it: polled at every step, slept on, never missed."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from agent.errors import Cancelled

BEAT_SLICE_S = 5.0  # a sleep still shows the worker alive at least this often


JITTER_SPREAD = 0.25  # the last quarter of each backoff is random: hosts that failed together retry apart


def next_delay_s(failures: int, initial_s: float, max_s: float, jitter: float = 0.0) -> float:
    """Exponential backoff: initial, 2x, 4x, ... capped at max; `jitter` in [0, 1) (random.random())
    takes up to JITTER_SPREAD of it off, so a fleet that lost its registry together does not come
    back to it in lockstep."""
    if failures <= 0:
        return 0.0
    return float(min(max_s, initial_s * (2 ** min(failures - 1, 30))) * (1 - JITTER_SPREAD * jitter))


class Cancel:
    """Set once by the daemon's main thread when the agent stops; read by the worker.

    Calling it (`cancelled()`) is the cheap poll long loops use; every call also records a
    heartbeat, so the main thread can tell a busy worker from a hung one.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._event = threading.Event()
        self._clock = clock
        self.beat_at = clock()

    def request(self) -> None:
        self._event.set()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def __call__(self) -> bool:
        self.beat_at = self._clock()
        return self._event.is_set()

    def check(self, what: str = "stopping") -> None:
        """Raise Cancelled if the agent is stopping."""
        if self():
            raise Cancelled(what)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking at once (with Cancelled) if the agent stops meanwhile."""
        end = self._clock() + seconds
        while True:
            self.check("stopping: wait abandoned")
            left = end - self._clock()
            if left <= 0:
                return
            self._event.wait(min(left, BEAT_SLICE_S))
