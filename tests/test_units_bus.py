"""Ordering drop-ins on disk and systemd reached over a real (private) D-Bus with dbusmock's systemd template."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.bus import MANAGER, Systemd
from agent.errors import HostError
from agent.units import DROPIN, apply_dropins, dropin_text, plan_dropins
from tests.support.bus import private_system_bus

KUBELET, MESOS = "kubelet.service", "dcos-mesos-slave.service"


@pytest.mark.parametrize(("configured", "existing", "write", "remove"), [
    ((KUBELET, MESOS), {}, (KUBELET, MESOS), ()),
    ((KUBELET, MESOS), {KUBELET: dropin_text(), MESOS: dropin_text()}, (), ()),
    ((KUBELET,), {KUBELET: dropin_text(), MESOS: dropin_text()}, (), (MESOS,)),
    ((KUBELET,), {KUBELET: "# an older text\n"}, (KUBELET,), ()),
    ((), {"x.service": "[Unit]\nAfter=y\n"}, (), ()),  # a file of ours by name but not by content: not touched
])
def test_dropin_plan(configured: tuple[str, ...], existing: dict[str, str], write: tuple[str, ...],
                     remove: tuple[str, ...]) -> None:
    """Missing or stale drop-ins are written; ours for units no longer configured are removed."""
    plan = plan_dropins(configured, existing)
    assert (plan.write, plan.remove) == (write, remove)


def test_dropins_on_disk_have_literal_ordering(tmp_path: Path) -> None:
    """The files carry literal Wants=/After= lines, and removal leaves other drop-ins alone."""
    apply_dropins(tmp_path, (KUBELET, MESOS))
    text = (tmp_path / f"{KUBELET}.d" / DROPIN).read_text()
    assert "After=nvidia-agent.service\n" in text
    assert "Wants=nvidia-agent.service\n" in text
    assert "$" not in text and "%" not in text
    (tmp_path / f"{MESOS}.d" / "10-admin.conf").write_text("[Service]\nNice=5\n")
    plan = apply_dropins(tmp_path, (KUBELET,))
    assert plan.remove == (MESOS,)
    assert sorted(p.name for p in (tmp_path / f"{MESOS}.d").iterdir()) == ["10-admin.conf"]
    assert apply_dropins(tmp_path, (KUBELET,)).write == ()


@pytest.fixture
def systemd_bus(tmp_path: Path) -> Iterator[object]:
    """A private dbus-daemon as the system bus, with python-dbusmock's systemd template on it."""
    dbusmock = pytest.importorskip("dbusmock")
    with private_system_bus(tmp_path):
        mock, obj = dbusmock.DBusTestCase.spawn_server_template("systemd", {}, stdout=subprocess.DEVNULL)
        obj.AddMethod(MANAGER, "Reload", "", "", "")
        try:
            yield obj
        finally:
            mock.terminate()
            mock.wait()


@pytest.mark.integration
def test_reload_and_units_over_dbus(systemd_bus: object) -> None:
    """Reload, StartUnit and unit state go over the bus with pydbus; the mock records the calls."""
    pytest.importorskip("pydbus")
    obj = systemd_bus
    obj.AddMockUnit("kubelet.service")  # type: ignore[attr-defined]
    systemd = Systemd()
    systemd.reload()
    systemd.start_unit("kubelet.service")
    assert systemd.active_state("kubelet.service") == "active"
    assert systemd.active_state("nope.service") == "unknown"
    methods = [c[1] for c in obj.GetCalls()]  # type: ignore[attr-defined]
    assert "Reload" in methods
    assert "StartUnit" in methods


def test_no_bus_is_a_host_error_not_a_crash() -> None:
    """Without a reachable systemd the error says so; callers decide what it means."""
    def broken() -> object:
        raise RuntimeError("no bus")

    with pytest.raises(HostError, match="systemd daemon-reload: no bus"):
        Systemd(bus_factory=broken).reload()


def test_without_pygobject_the_bus_fails_as_a_host_error_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """README's plain `pip install .` brings pydbus but not PyGObject: starting a transient unit must
    raise HostError (which the caller falls back from), never an ImportError that crashes the pass."""
    import sys  # noqa: PLC0415

    class Manager:
        def StartTransientUnit(self, *args: object) -> None:
            raise AssertionError("the variant types are built first")

    class Bus:
        def get(self, _name: str) -> dict[str, Manager]:
            return {MANAGER: Manager()}

    monkeypatch.setitem(sys.modules, "gi", None)  # `import gi...` raises ImportError
    monkeypatch.delitem(sys.modules, "gi.repository", raising=False)
    with pytest.raises(HostError, match="install PyGObject"):
        Systemd(bus_factory=Bus).start_transient("x.service", ["/bin/true"], [])


def test_persistenced_falls_back_to_spawning_without_the_bus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No usable bus: nvidia-persistenced is started directly instead of as a transient unit."""
    from agent import persistenced  # noqa: PLC0415

    (tmp_path / "tree/bin").mkdir(parents=True)
    (tmp_path / "tree/bin/nvidia-persistenced").write_text("#!/bin/sh\n")
    spawned: list[list[str]] = []
    monkeypatch.setattr(persistenced, "PID_FILE", str(tmp_path / "run/nvidia-persistenced.pid"))
    monkeypatch.setattr(persistenced.subp, "spawn", lambda argv, env=None: spawned.append(list(argv)) or 4242)

    def no_bus() -> object:
        raise ImportError("No module named 'gi'")

    got = persistenced.ensure_persistenced(tmp_path / "tree", Path("/"), Systemd(bus_factory=no_bus))
    assert got == 4242
    assert spawned == [[str(tmp_path / "tree/bin/nvidia-persistenced"), "--verbose"]]
