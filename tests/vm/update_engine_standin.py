#!/usr/bin/python3
"""update_engine's D-Bus face, for the VM guest (python3-gi only: the guest has no dbusmock).

Owns com.coreos.update1 on the system bus and exports /com/coreos/update1 with exactly the
interface of flatcar/update_engine's update_engine.xml (installed beside this script as
update_engine.xml, the fixture tests/fixtures/update/update_engine.xml): GetStatus (xdssx),
AttemptUpdate, ResetStatus and the StatusUpdate signal.

What GetStatus answers is the test's to set: the JSON list [last_checked_time, progress,
current_operation, new_version, new_size] in /run/update-engine-standin.json (absent: idle, as
after a boot). SIGHUP re-reads it and emits StatusUpdate, as update_engine does on every change.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from gi.repository import Gio, GLib

BUS_NAME = "com.coreos.update1"
OBJECT_PATH = "/com/coreos/update1"
INTERFACE = "com.coreos.update1.Manager"
STATE = Path("/run/update-engine-standin.json")
IDLE = [0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0]


def status() -> GLib.Variant:
    try:
        v = json.loads(STATE.read_text())
        value = (int(v[0]), float(v[1]), str(v[2]), str(v[3]), int(v[4]))
    except (OSError, ValueError, IndexError, TypeError):
        value = tuple(IDLE)
    return GLib.Variant("(xdssx)", value)


def main() -> int:
    xml = (Path(__file__).parent / "update_engine.xml").read_text()
    node = Gio.DBusNodeInfo.new_for_xml(xml)
    iface = node.lookup_interface(INTERFACE)
    bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)

    def call(_conn, _sender, _path, _iface, method, _params, invocation):
        if method == "GetStatus":
            invocation.return_value(status())
        elif method == "ResetStatus":
            STATE.unlink(missing_ok=True)
            invocation.return_value(None)
        else:  # AttemptUpdate: nothing to check for here
            invocation.return_value(None)

    bus.register_object(OBJECT_PATH, iface, call, None, None)

    def emit() -> bool:
        bus.emit_signal(None, OBJECT_PATH, INTERFACE, "StatusUpdate", status())
        return GLib.SOURCE_CONTINUE

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGHUP, lambda: emit() and True)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, lambda: loop.quit() or False)
    Gio.bus_own_name_on_connection(bus, BUS_NAME, Gio.BusNameOwnerFlags.NONE, None,
                                   lambda *_: (print(f"lost {BUS_NAME}", file=sys.stderr), loop.quit()))
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
