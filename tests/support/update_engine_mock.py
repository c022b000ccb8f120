"""python-dbusmock template: Flatcar's update_engine as its D-Bus interface defines it.

tests/fixtures/update/update_engine.xml is the real interface (flatcar/update_engine); the test
that uses this template introspects it and compares. Bus name, object and interface are those of
dbus_constants.h. The test drives it through the mock interface:

    SetStatus(x last_checked_time, d progress, s current_operation, s new_version, x new_size)
        sets what GetStatus returns and emits StatusUpdate, as update_engine does on every change.

    DBusTestCase.spawn_server_template("tests/support/update_engine_mock.py", {}, system_bus=True)
"""

from __future__ import annotations

from typing import Any

import dbus  # type: ignore[import-not-found]
import dbus.service  # type: ignore[import-not-found]
from dbusmock import MOCK_IFACE  # type: ignore[import-untyped]

BUS_NAME = "com.coreos.update1"
MAIN_OBJ = "/com/coreos/update1"
MAIN_IFACE = "com.coreos.update1.Manager"
SYSTEM_BUS = True
IDLE = (0, 0.0, "UPDATE_STATUS_IDLE", "0.0.0", 0)


def load(mock: Any, parameters: dict[str, Any]) -> None:
    mock.update_status = tuple(parameters.get("status", IDLE))
    mock.AddMethods(MAIN_IFACE, [
        ("AttemptUpdate", "", "", ""),
        ("ResetStatus", "", "", f"self.update_status = {IDLE!r}"),
        ("GetStatus", "", "xdssx", "ret = tuple(self.update_status)"),
    ])


@dbus.service.method(MOCK_IFACE, in_signature="xdssx", out_signature="")
def SetStatus(self: Any, checked: int, progress: float, operation: str, version: str, size: int) -> None:  # noqa: PLR0917 - the interface's five values
    self.update_status = (int(checked), float(progress), str(operation), str(version), int(size))
    self.EmitSignal(MAIN_IFACE, "StatusUpdate", "xdssx", list(self.update_status))
