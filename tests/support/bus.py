"""A private dbus-daemon standing in for the system bus, for python-dbusmock's stand-ins."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def private_system_bus(tmp_path: Path) -> Iterator[str]:
    """Start a dbus-daemon on a socket under tmp_path and point DBUS_SYSTEM_BUS_ADDRESS at it."""
    config = tmp_path / "bus.conf"
    config.write_text(f"""<busconfig><type>system</type><listen>unix:path={tmp_path}/bus</listen>
<policy context="default"><allow send_destination="*" eavesdrop="true"/><allow eavesdrop="true"/>
<allow own="*"/></policy></busconfig>""")
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address"],
                              stdout=subprocess.PIPE, text=True)
    address = daemon.stdout.readline().strip()  # type: ignore[union-attr]
    old = os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
    try:
        yield address
    finally:
        daemon.terminate()
        daemon.wait()
        if old is None:
            os.environ.pop("DBUS_SYSTEM_BUS_ADDRESS", None)
        else:
            os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = old


UPDATE_ENGINE_TEMPLATE = str(Path(__file__).parent / "update_engine_mock.py")


@contextlib.contextmanager
def update_engine_stand_in() -> Iterator[Any]:
    """update_engine (tests/support/update_engine_mock.py) on the private system bus; yields its
    dbus-python proxy (SetStatus, ResetStatus on the mock interface)."""
    import dbusmock  # noqa: PLC0415 - the test group's python-dbusmock

    mock, obj = dbusmock.DBusTestCase.spawn_server_template(UPDATE_ENGINE_TEMPLATE, {}, stdout=subprocess.DEVNULL)
    try:
        yield obj
    finally:
        mock.terminate()
        mock.wait()
