"""What the guest's D-Bus stand-ins share (python3-gi only): their interface from the real XML
beside them, and serving a bus name until SIGTERM. Installed beside them in the guest."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from pathlib import Path

from gi.repository import Gio, GLib


def interface(xml_file: str, name: str) -> Gio.DBusInterfaceInfo:
    """Interface `name` as the XML file beside the stand-ins defines it."""
    return Gio.DBusNodeInfo.new_for_xml((Path(__file__).parent / xml_file).read_text()).lookup_interface(name)


def serve(bus: Gio.DBusConnection, bus_name: str, on_hup: Callable[[], object] | None = None) -> int:
    """Own `bus_name` on `bus` and run until SIGTERM (or the name is lost); SIGHUP calls `on_hup`."""
    loop = GLib.MainLoop()
    if on_hup is not None:
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGHUP, lambda: on_hup() or True)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, lambda: loop.quit() or False)
    Gio.bus_own_name_on_connection(bus, bus_name, Gio.BusNameOwnerFlags.NONE, None,
                                   lambda *_: (print(f"lost {bus_name}", file=sys.stderr), loop.quit()))
    loop.run()
    return 0
