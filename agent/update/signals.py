"""update_engine's StatusUpdate signal (I/O): a pass as soon as the updater's operation changes.

update_engine emits StatusUpdate (xdssx, the same values as GetStatus) on every change, many a
second while it downloads (the progress). Only a change of `current_operation` matters here:
UPDATE_STATUS_UPDATED_NEED_REBOOT arriving (stage now, not at the next update.poll_s), or the
status going back to idle (an update withdrawn). The signal only wakes the agent; what the
next boot is still comes from GetStatus and the kernel slots, in the pass.

pydbus delivers signals from a GLib main loop, which runs here in a thread of its own on a bus
connection of its own. Without PyGObject or a bus, nothing is subscribed and polling stays.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog

from agent.update import update_engine

NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"


class StatusSignals:
    """Calls `on_change(operation)` from its own thread when update_engine's operation changes."""

    def __init__(self, on_change: Callable[[str], None]) -> None:
        self._on_change = on_change
        self._loop: Any = None
        self._subscription: Any = None
        self._thread: threading.Thread | None = None
        self._last: str | None = None
        self.log = structlog.get_logger("nvidia-agent")

    def start(self) -> bool:
        """Subscribe; False (logged at debug) where that cannot be done: polling alone then."""
        try:
            import pydbus  # noqa: PLC0415 - needs PyGObject, as every bus client here
            from gi.repository import GLib  # noqa: PLC0415

            context = GLib.MainContext.new()
            context.push_thread_default()  # the connection and its signals belong to this context
            try:
                bus = pydbus.connect(_system_address())  # a connection of its own, for this context
                # sender: only update_engine's own name; anyone may send a signal on the system bus
                self._subscription = bus.subscribe(sender=update_engine.BUS_NAME, iface=update_engine.INTERFACE,
                                                   signal=update_engine.SIGNAL,
                                                   object=update_engine.OBJECT_PATH, signal_fired=self._fired)
            finally:
                context.pop_thread_default()
            self._loop = GLib.MainLoop.new(context, False)
        except Exception as exc:  # ImportError, GLib.Error: no bus here
            self.log.debug("update_signals_unavailable", error=f"{type(exc).__name__}: {exc}")
            return False
        self._thread = threading.Thread(target=self._loop.run, name="update-signals", daemon=True)
        self._thread.start()
        return True

    def _fired(self, _sender: str, _path: str, _iface: str, _signal: str, params: Any) -> None:
        try:
            operation = update_engine.Status.from_dbus(tuple(params)).current_operation
        except (update_engine.BadStatus, TypeError, ValueError):
            return  # not the interface's signature: GetStatus in the pass says what is wrong
        before, self._last = self._last, operation
        if before is None or (before == NEED_REBOOT) != (operation == NEED_REBOOT):  # into or out of it
            self._on_change(operation)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.quit()
        if self._thread is not None:
            self._thread.join(timeout=2)


def _system_address() -> str:
    """The system bus's address, as libdbus finds it (DBUS_SYSTEM_BUS_ADDRESS, else the standard socket)."""
    import os  # noqa: PLC0415

    return os.environ.get("DBUS_SYSTEM_BUS_ADDRESS") or "unix:path=/run/dbus/system_bus_socket"
