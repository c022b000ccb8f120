#!/usr/bin/python3
"""rpm-ostreed's Sysroot on the system bus, for the VM guest (python3-gi only).

Owns org.projectatomic.rpmostree1 and exports /org/projectatomic/rpmostree1/Sysroot with the
Sysroot interface exactly as coreos/rpm-ostree's org.projectatomic.rpmostree1.xml defines it
(installed beside this script as rpm-ostree-sysroot.xml, the fixture of the same name). The
test sets the deployments: a JSON list of dictionaries in /run/rpm-ostree-standin.json, each
value typed as the interface's comment says (id s, osname s, serial i, checksum s, version s,
timestamp t, origin s, booted b; staged and pinned b as rpm-ostree adds them). Absent: no
deployments. Methods answer as a daemon with nothing to do would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from gi.repository import Gio, GLib
from gio_standin import interface, serve  # beside this script in the guest

BUS_NAME = "org.projectatomic.rpmostree1"
OBJECT_PATH = "/org/projectatomic/rpmostree1/Sysroot"
INTERFACE = "org.projectatomic.rpmostree1.Sysroot"
STATE = Path("/run/rpm-ostree-standin.json")
TYPES = {"id": "s", "osname": "s", "serial": "i", "checksum": "s", "version": "s", "timestamp": "t",
         "origin": "s", "booted": "b", "staged": "b", "pinned": "b"}


def deployments() -> GLib.Variant:
    try:
        records = json.loads(STATE.read_text())
    except (OSError, ValueError):
        records = []
    typed = [{k: GLib.Variant(TYPES[k], v) for k, v in r.items() if k in TYPES} for r in records]
    return GLib.Variant("aa{sv}", typed)


PROPERTIES = {
    "Deployments": deployments,
    "Booted": lambda: GLib.Variant("o", "/org/projectatomic/rpmostree1/fedora_coreos"),
    "Path": lambda: GLib.Variant("s", "/"),
    "ActiveTransaction": lambda: GLib.Variant("(sss)", ("", "", "")),
    "ActiveTransactionPath": lambda: GLib.Variant("s", ""),
    "AutomaticUpdatePolicy": lambda: GLib.Variant("s", "none"),
}


def main() -> int:
    bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)

    def call(_conn, _sender, _path, _iface, method, _params, invocation):
        if method == "GetOS":
            invocation.return_value(GLib.Variant("(o)", ("/org/projectatomic/rpmostree1/fedora_coreos",)))
        else:  # RegisterClient, UnregisterClient, Reload, ReloadConfig
            invocation.return_value(None)

    def get(_conn, _sender, _path, _iface, name):
        return PROPERTIES[name]()

    bus.register_object(OBJECT_PATH, interface("rpm-ostree-sysroot.xml", INTERFACE), call, get, None)
    return serve(bus, BUS_NAME)


if __name__ == "__main__":
    sys.exit(main())
