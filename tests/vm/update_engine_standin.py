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
import sys
from pathlib import Path

from gi.repository import Gio, GLib
from gio_standin import interface, serve  # beside this script in the guest

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
    bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)

    def call(_conn, _sender, _path, _iface, method, _params, invocation):
        if method == "GetStatus":
            invocation.return_value(status())
        elif method == "ResetStatus":
            STATE.unlink(missing_ok=True)
            invocation.return_value(None)
        else:  # AttemptUpdate: nothing to check for here
            invocation.return_value(None)

    bus.register_object(OBJECT_PATH, interface("update_engine.xml", INTERFACE), call, None, None)
    return serve(bus, BUS_NAME,  # SIGHUP: StatusUpdate, as update_engine emits on every change
                 on_hup=lambda: bus.emit_signal(None, OBJECT_PATH, INTERFACE, "StatusUpdate", status()))


if __name__ == "__main__":
    sys.exit(main())
