"""The one module that owns the system bus: systemd's Manager over D-Bus with pydbus."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.errors import HostError

SYSTEMD = "org.freedesktop.systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"


def _system_bus() -> Any:
    try:
        import pydbus  # noqa: PLC0415 - needs PyGObject (python3-gi), only on hosts with systemd
    except ImportError as exc:
        raise HostError(f"cannot talk to systemd: {exc}", hint="install PyGObject (python3-gi) for pydbus") from None
    return pydbus.SystemBus()


class Systemd:
    """Reload, start/stop units and read their state. The bus is opened on first use."""

    def __init__(self, bus_factory: Callable[[], Any] = _system_bus) -> None:
        self._bus_factory = bus_factory
        self._bus: Any = None

    def _call(self, what: str, fn: Callable[[Any], Any]) -> Any:
        try:
            if self._bus is None:
                self._bus = self._bus_factory()
            return fn(self._bus.get(SYSTEMD)[MANAGER])
        except HostError:
            raise
        except ImportError as exc:  # PyGObject missing: pydbus cannot work at all
            raise HostError(f"cannot talk to systemd: {exc}",
                            hint="install PyGObject (python3-gi) for pydbus") from None
        except Exception as exc:  # GLib.Error and friends: the bus or systemd said no
            raise HostError(f"systemd {what}: {exc}") from exc

    def reload(self) -> None:
        """`systemctl daemon-reload`: make systemd read changed unit files and drop-ins."""
        self._call("daemon-reload", lambda m: m.Reload())

    def start_unit(self, name: str) -> None:
        self._call(f"start {name}", lambda m: m.StartUnit(name, "replace"))

    def stop_unit(self, name: str) -> None:
        self._call(f"stop {name}", lambda m: m.StopUnit(name, "replace"))

    def start_transient(self, name: str, argv: list[str], properties: list[tuple[str, Any]]) -> None:
        """A unit made on the fly (e.g. nvidia-persistenced from the installed tree)."""
        def start(manager: Any) -> Any:
            from gi.repository import GLib  # noqa: PLC0415 - the variant types pydbus needs for a(sv)

            props = [("ExecStart", GLib.Variant("a(sasb)", [(argv[0], argv, False)]))]
            props += [(k, v if isinstance(v, GLib.Variant) else GLib.Variant("s", v)) for k, v in properties]
            return manager.StartTransientUnit(name, "replace", props, [])

        self._call(f"start transient {name}", start)

    def shutting_down(self) -> bool:
        """Whether the system is going down: Manager.SystemState is "stopping" while shutdown.target
        is pending (a reboot, poweroff, halt or kexec), not for a plain `systemctl stop`."""
        return str(self._call("SystemState", lambda m: m.SystemState)) == "stopping"

    def active_state(self, name: str) -> str:
        """ActiveState of a loaded unit ("active", "inactive", "failed", ...), "unknown" if not loaded."""
        def state(m: Any) -> str:
            try:
                path = m.GetUnit(name)
            except Exception:  # NoSuchUnit
                return "unknown"
            return str(self._bus.get(SYSTEMD, path)[UNIT].ActiveState)
        return str(self._call(f"state of {name}", state))
