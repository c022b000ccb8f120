"""systemd's notify protocol (sd_notify): READY=1, STATUS=, WATCHDOG=1, STOPPING=1 over $NOTIFY_SOCKET."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping

SEND_TIMEOUT_S = 2.0


class Notifier:
    """Sends notify datagrams when systemd asked for them; does nothing otherwise."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.address = address
        self.watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
        self._clock = clock
        self._last_ping = clock()

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        usec = env.get("WATCHDOG_USEC")
        pid = env.get("WATCHDOG_PID")
        mine = pid is None or pid == str(os.getpid())
        return cls(env.get("NOTIFY_SOCKET") or None, int(usec) if usec and usec.isdigit() and mine else None)

    def send(self, **fields: str) -> bool:
        """One datagram of KEY=value lines. Returns whether it was sent."""
        if not self.address:
            return False
        message = "\n".join(f"{k}={v.replace(chr(10), ' ')}" for k, v in fields.items()).encode()
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT_S)  # a notify socket nobody drains must not stall the agent
                sock.sendto(message, address)
        except OSError:
            return False
        return True

    def status(self, text: str) -> None:
        self.send(STATUS=text)

    @property
    def ping_interval_s(self) -> float | None:
        """Ping at half the watchdog period, as sd_watchdog_enabled(3) recommends."""
        return self.watchdog_s / 2 if self.watchdog_s else None

    def ping_if_due(self) -> None:
        interval = self.ping_interval_s
        if interval is not None and self._clock() - self._last_ping >= interval:
            self.ping()

    def ping(self) -> None:
        self._last_ping = self._clock()
        self.send(WATCHDOG="1")
