"""The updaters on the system bus (pydbus): Flatcar's update_engine and rpm-ostree's Sysroot.

Thin: each call returns the pure model of update_engine.py / rpm_ostree.py, and every failure
(no bus, no such service, a refused call, an answer the interface cannot give) is a HostError
naming the service, never a crash of the daemon. Polled by the caller every update.poll_s;
update_engine's StatusUpdate signal (signals.py) wakes the daemon for a pass in between.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.bus import _system_bus
from agent.errors import HostError
from agent.update import rpm_ostree, update_engine


def _unpack(value: Any) -> Any:
    """pydbus hands back plain Python values; a GLib.Variant left inside is unpacked."""
    unpack = getattr(value, "unpack", None)
    return unpack() if callable(unpack) else value


class UpdaterBus:
    def __init__(self, bus_factory: Callable[[], Any] = _system_bus) -> None:
        self._bus_factory = bus_factory
        self._bus: Any = None

    def _proxy(self, service: str, path: str) -> Any:
        if self._bus is None:
            self._bus = self._bus_factory()
        return self._bus.get(service, path)

    def update_engine_status(self) -> update_engine.Status:
        """update_engine's GetStatus, checked against its interface."""
        try:
            reply = self._proxy(update_engine.BUS_NAME, update_engine.OBJECT_PATH)[update_engine.INTERFACE].GetStatus()
        except HostError:
            raise
        except Exception as exc:  # GLib.Error: no such name, access denied (only root and core may call)
            self._bus = None  # the bus itself may have gone (dbus-broker restarted): connect afresh next time
            raise HostError(f"update_engine GetStatus: {exc}",
                            hint="is update-engine.service running, and the agent root?") from exc
        try:
            return update_engine.Status.from_dbus(tuple(_unpack(v) for v in reply))
        except (update_engine.BadStatus, TypeError) as exc:
            raise HostError(f"update_engine answered what its interface cannot: {exc}") from None

    def rpm_ostree_next(self) -> rpm_ostree.Deployment | None:
        """The deployment rpm-ostree boots next, if not the booted one (Sysroot.Deployments; this
        activates rpm-ostreed if it is idle), checked."""
        try:
            sysroot = self._proxy(rpm_ostree.BUS_NAME, rpm_ostree.SYSROOT_PATH)[rpm_ostree.SYSROOT_INTERFACE]
            records = [{k: _unpack(v) for k, v in _unpack(d).items()} for d in sysroot.Deployments]
        except HostError:
            raise
        except Exception as exc:
            self._bus = None
            raise HostError(f"rpm-ostree Sysroot.Deployments: {exc}", hint="is rpm-ostreed reachable?") from exc
        try:
            return rpm_ostree.next_deployment(records)
        except rpm_ostree.BadDeployment as exc:
            raise HostError(f"rpm-ostree answered what its interface cannot: {exc}") from None
