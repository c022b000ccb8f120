"""agent/update/bus.py against stand-ins on a private system bus (python-dbusmock) that speak the
updaters' real interfaces: update_engine's as tests/fixtures/update/update_engine.xml defines it
(the stand-in is introspected and compared), rpm-ostree's Sysroot.Deployments (aa{sv})."""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import HostError
from agent.update import rpm_ostree, update_engine
from agent.update.bus import UpdaterBus
from tests.support.bus import private_system_bus, update_engine_stand_in

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent / "fixtures/update"


@pytest.fixture
def system_bus(tmp_path: Path) -> Iterator[Any]:
    dbusmock = pytest.importorskip("dbusmock")
    with private_system_bus(tmp_path):
        yield dbusmock


@pytest.fixture
def connect() -> Callable[[], Any]:
    """A new connection to this test's bus each time: pydbus.SystemBus() is one per process, and
    would outlive the private bus of an earlier test."""
    import pydbus  # noqa: PLC0415 - needs PyGObject

    return lambda: pydbus.connect(os.environ["DBUS_SYSTEM_BUS_ADDRESS"])


@pytest.fixture
def update_engine_mock(system_bus: Any) -> Iterator[Any]:
    with update_engine_stand_in() as obj:
        yield obj


def members(xml: str, interface: str) -> dict[str, list[tuple[str, str]]]:
    """method/signal name -> [(direction, type)] of one interface in introspection XML."""
    root = ET.fromstring(xml)  # noqa: S314 - our fixture and our own stand-in's introspection
    iface = next(i for i in root.iter("interface") if i.get("name") == interface)
    out = {}
    for el in iface:
        if el.tag in ("method", "signal"):
            out[f"{el.tag} {el.get('name')}"] = [(a.get("direction", "out" if el.tag == "signal" else "in"),
                                                  a.get("type", "")) for a in el.iter("arg")]
    return out


def test_the_stand_in_speaks_update_engines_real_interface(update_engine_mock: Any,
                                                           connect: Callable[[], Any]) -> None:
    proxy = connect().get(update_engine.BUS_NAME, update_engine.OBJECT_PATH)
    real = members((FIXTURES / "update_engine.xml").read_text(), update_engine.INTERFACE)
    mocked = members(proxy.Introspect(), update_engine.INTERFACE)
    # dbusmock declares signals only when emitted: compare the methods, then the signal's signature
    assert {k: v for k, v in mocked.items() if k.startswith("method")} == \
        {k: v for k, v in real.items() if k.startswith("method")}
    assert real["signal StatusUpdate"] == [("out", t) for t in "xdssx"]


def test_status_over_the_bus(update_engine_mock: Any, connect: Callable[[], Any]) -> None:
    bus = UpdaterBus(connect)
    assert bus.update_engine_status().current_operation == "UPDATE_STATUS_IDLE"
    assert bus.update_engine_status().staged_version is None
    update_engine_mock.SetStatus(1556272591, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "2079.3.2", 399568805,
                                 dbus_interface="org.freedesktop.DBus.Mock")
    status = bus.update_engine_status()
    assert status == update_engine.parse_client_output((FIXTURES / "ue-flatcar-need-reboot.txt").read_text())
    assert status.staged_version == "2079.3.2"


def test_an_answer_the_interface_cannot_give_is_a_host_error(update_engine_mock: Any,
                                                              connect: Callable[[], Any]) -> None:
    update_engine_mock.SetStatus(0, 0.0, "UPDATE_STATUS_UPDATED_NEED_REBOOT", "../../x", 0,
                                 dbus_interface="org.freedesktop.DBus.Mock")
    with pytest.raises(HostError, match="interface cannot"):
        UpdaterBus(connect).update_engine_status()


def test_no_update_engine_is_a_host_error(system_bus: Any, connect: Callable[[], Any]) -> None:
    with pytest.raises(HostError, match="update_engine GetStatus") as err:
        UpdaterBus(connect).update_engine_status()
    assert err.value.hint and "update-engine.service" in err.value.hint


@pytest.fixture
def rpm_ostree_mock(system_bus: Any) -> Iterator[Any]:
    import dbus.bus  # noqa: PLC0415 - dbus-python comes with python-dbusmock

    mock = system_bus.DBusTestCase.spawn_server(rpm_ostree.BUS_NAME, rpm_ostree.SYSROOT_PATH,
                                                rpm_ostree.SYSROOT_INTERFACE, system_bus=True,
                                                stdout=subprocess.DEVNULL)
    obj = dbus.bus.BusConnection(os.environ["DBUS_SYSTEM_BUS_ADDRESS"]).get_object(rpm_ostree.BUS_NAME,
                                                                                 rpm_ostree.SYSROOT_PATH)
    records = json.loads((FIXTURES / "rpm-ostree-status-staged.json").read_text())["deployments"]
    keep = ("id", "osname", "serial", "checksum", "version", "timestamp", "origin", "staged", "booted", "pinned")
    deployments = dbus.Array([dbus.Dictionary({k: r[k] for k in keep if k in r}, signature="sv") for r in records],
                             signature="a{sv}")
    obj.AddProperty(rpm_ostree.SYSROOT_INTERFACE, "Deployments", deployments,
                    dbus_interface="org.freedesktop.DBus.Mock")
    try:
        yield obj
    finally:
        mock.terminate()
        mock.wait()


def test_the_staged_deployment_over_the_bus(rpm_ostree_mock: Any, connect: Callable[[], Any]) -> None:
    nxt = UpdaterBus(connect).rpm_ostree_next()
    assert nxt is not None and nxt.version == "31.20200517.3.0" and nxt.serial == 0 and nxt.staged


def test_the_signal_wakes_the_agent_only_when_reboot_needed_comes_or_goes() -> None:
    """update_engine signals every progress step while downloading: only the transitions into and
    out of UPDATED_NEED_REBOOT (and the first word heard) call back; a body the interface cannot
    carry is ignored."""
    from agent.update.signals import StatusSignals  # noqa: PLC0415

    seen: list[str] = []
    signals = StatusSignals(seen.append)
    for op, progress in [("UPDATE_STATUS_IDLE", 0.0), ("UPDATE_STATUS_DOWNLOADING", 0.1),
                         ("UPDATE_STATUS_DOWNLOADING", 0.5), ("UPDATE_STATUS_FINALIZING", 1.0),
                         ("UPDATE_STATUS_UPDATED_NEED_REBOOT", 1.0), ("UPDATE_STATUS_UPDATED_NEED_REBOOT", 1.0),
                         ("UPDATE_STATUS_IDLE", 0.0)]:
        signals._fired(":1.1", "/com/coreos/update1", "com.coreos.update1.Manager", "StatusUpdate",
                       (1700000000, progress, op, "3815.2.1", 1))
    signals._fired(":1.1", "/", "i", "StatusUpdate", ("not", "the", "signature"))
    assert seen == ["UPDATE_STATUS_IDLE", "UPDATE_STATUS_UPDATED_NEED_REBOOT", "UPDATE_STATUS_IDLE"]
