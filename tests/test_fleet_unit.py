"""agent/fleet's pure parts: the CDI spec (valid for CDI 0.5.0 whatever the host has), NFD's features,
the GPU operator's markers, the metrics as Prometheus reads them."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from agent.fleet import cdi
from agent.fleet.features import HOST_DRIVER_STATUS, label_value, nfd_features, operator_markers
from agent.fleet.metrics import Metrics
from agent.fleet.publish import Publisher, multiarch
from agent.fleet.serve import MetricsServer
from agent.hostroot import HostRoot
from agent.status import Phase, Snapshot
from support.registry import free_port

READY = Snapshot(phase=Phase.READY, driver="535.261.03", active_driver="535.261.03", kernel="6.1.0-28-amd64",
                 os_key="flatcar-1-6.1.0-28-amd64",
                 current="/opt/nvidia/535.261.03/flatcar-1-6.1.0-28-amd64", digest="sha256:" + "a" * 64,
                 devices=("/dev/nvidiactl", "/dev/nvidia0", "/dev/nvidia1", "/dev/nvidia-uvm"))
TREE = READY.current
REPO = Path(__file__).resolve().parents[1]


def test_the_spec_has_a_device_per_gpu_and_all_and_the_tree_read_only() -> None:
    doc = cdi.spec(READY.devices, [(f"{TREE}/lib64/libcuda.so.1", "/usr/lib64/libcuda.so.1")],
                   [(f"{TREE}/bin/nvidia-smi", "/usr/bin/nvidia-smi")])
    assert doc is not None and cdi.validate(doc) == []
    assert [d["name"] for d in doc["devices"]] == ["0", "1", "all"]
    assert doc["devices"][2]["containerEdits"]["deviceNodes"] == [{"path": "/dev/nvidia0"}, {"path": "/dev/nvidia1"}]
    common = doc["containerEdits"]
    assert common["deviceNodes"] == [{"path": "/dev/nvidiactl"}, {"path": "/dev/nvidia-uvm"}]
    assert {m["containerPath"] for m in common["mounts"]} == {"/usr/lib64/libcuda.so.1", "/usr/bin/nvidia-smi"}
    assert all(m["options"] == ["ro", "nosuid", "nodev", "bind"] for m in common["mounts"])
    assert cdi.spec(("/dev/nvidiactl",), [], []) is None, "no GPU node: no spec"


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._-+", min_size=1, max_size=30)


@given(minors=st.sets(st.integers(0, 255), max_size=8), control=st.sets(st.sampled_from(cdi.CONTROL_NODES)),
       libs=st.lists(names, max_size=10), tools=st.lists(names, max_size=5))
def test_whatever_the_host_has_the_spec_is_valid(minors: set[int], control: set[str], libs: list[str],
                                                 tools: list[str]) -> None:
    devices = [f"/dev/nvidia{m}" for m in minors] + [f"/dev/{c}" for c in control]
    doc = cdi.spec(devices, [(f"{TREE}/lib64/{n}", f"/usr/lib64/{n}") for n in libs],
                   [(f"{TREE}/bin/{n}", f"/usr/bin/{n}") for n in tools])
    if not minors:
        assert doc is None
        return
    assert doc is not None
    assert cdi.validate(doc) == []
    assert len(doc["devices"]) == len(minors) + 1


@pytest.mark.parametrize(("change", "problem"), [
    ({"cdiVersion": "0.6.0"}, "cdiVersion"),
    ({"kind": "gpu"}, "vendor/class"),
    ({"devices": []}, "no devices"),
    ({"devices": [{"name": "-x", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}]}, "device name"),
    ({"devices": [{"name": "0", "containerEdits": {}}]}, "no edits"),
    ({"devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "dev/nvidia0"}]}}]}, "absolute"),
    ({"devices": [{"name": "0", "containerEdits": {"deviceNodes": [{"path": "/dev/nvidia0"}]}}] * 2}, "twice"),
    ({"containerEdits": {"mounts": [{"hostPath": "/a", "containerPath": "b"}]}}, "absolute hostPath"),
    ({"containerEdits": {"devices": []}}, "unknown containerEdits"),
])
def test_the_validator_refuses_what_runtimes_refuse(change: dict[str, Any], problem: str) -> None:
    doc = cdi.spec(READY.devices, [], [])
    assert doc is not None
    assert any(problem in p for p in cdi.validate({**doc, **change}))


def test_features_and_markers_follow_whether_the_driver_works() -> None:
    assert nfd_features(READY) == ("nvidia-agent.driver-version=535.261.03\nnvidia-agent.ready=true\n"
                                   "nvidia-agent.kernel=6.1.0-28-amd64\nnvidia-agent.next-boot-ready=true\n")
    staging = replace(READY, next_boot={"state": "missing"})
    assert "nvidia-agent.next-boot-ready=false\n" in (nfd_features(staging) or "")
    degraded = replace(READY, phase=Phase.DEGRADED)
    assert "nvidia-agent.ready=false\n" in (nfd_features(degraded) or "")
    assert operator_markers(degraded) is None
    assert operator_markers(replace(degraded, serving=TREE)) == {"driver-ready": HOST_DRIVER_STATUS,
                                                                 "host-driver-ready": ""}
    assert nfd_features(replace(READY, current=None)) is None
    assert nfd_features(replace(READY, phase=Phase.NO_GPU)) is None


@given(st.text(max_size=100))
def test_label_values_are_always_valid(text: str) -> None:
    value = label_value(text)
    assert len(value) <= 63 and (value == "" or (value[0].isalnum() and value[-1].isalnum() and value.isascii()))


def test_metrics_read_back_with_prometheus_own_parser() -> None:
    metrics = Metrics()
    metrics.observe(replace(READY, next_boot={"state": "staging"}))
    metrics.passed(Phase.READY, None, 1234.0)
    metrics.passed(Phase.DEGRADED, "RegistryUnavailable", 1300.0)
    metrics.installed("registry", 2.5, 4.0, 1000)
    metrics.installed("imported", None, 1.0, 0)
    families = {f.name: f for f in text_string_to_metric_families(metrics.render().decode())}
    got = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert got[("nvidia_agent_ready", ())] == 1
    assert got[("nvidia_agent_next_boot", (("nvidia_agent_next_boot", "staging"),))] == 1
    assert got[("nvidia_agent_last_success_timestamp_seconds", ())] == 1234.0
    assert got[("nvidia_agent_errors_total", (("kind", "RegistryUnavailable"),))] == 1
    assert got[("nvidia_agent_install_duration_seconds_count", ())] == 2
    assert got[("nvidia_agent_pull_duration_seconds_count", (("source", "registry"),))] == 1
    assert got[("nvidia_agent_pulled_bytes_total", (("source", "registry"),))] == 1000
    assert families["nvidia_agent_ready"].documentation.startswith("1 when")
    metrics.observe(replace(READY, phase=Phase.NO_GPU, current=None))
    assert "nvidia_agent_driver_info{" not in metrics.render().decode()


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    families = text_string_to_metric_families(metrics.render().decode())
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_what_happens_before_the_first_render_is_kept_in_totals_and_counted_once() -> None:
    """The registry is built at the first render (prometheus-client is imported then): what came before is
    kept as totals, not one record per pass (a daemon nobody scrapes must not grow), and counted once."""
    metrics = Metrics()
    for _ in range(10_000):
        metrics.passed(Phase.READY, None, 1.0)
    metrics.passed(Phase.DEGRADED, "ImageRejected", 2.0)
    metrics.installed("registry", 1.5, 3.0, 10)
    assert len(metrics._totals) == 4 and len(metrics._observed) == 2  # bounded by labels and installs
    got = _samples(metrics)
    assert got[("nvidia_agent_reconciles_total", (("outcome", "ready"),))] == 10_000
    assert got[("nvidia_agent_errors_total", (("kind", "ImageRejected"),))] == 1
    assert got[("nvidia_agent_pulled_bytes_total", (("source", "registry"),))] == 10
    metrics.passed(Phase.READY, None, 3.0)  # after the build: straight into the registry
    metrics.installed("registry", 0.5, 1.0, 5)
    got = _samples(metrics)
    assert got[("nvidia_agent_reconciles_total", (("outcome", "ready"),))] == 10_001
    assert got[("nvidia_agent_install_duration_seconds_count", ())] == 2
    assert got[("nvidia_agent_pulled_bytes_total", (("source", "registry"),))] == 15
    assert got[("nvidia_agent_last_success_timestamp_seconds", ())] == 3.0


def test_the_endpoint_serves_metrics_and_survives_slow_and_malformed_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /metrics parses back; a client that sends a byte now and then, and one that sends garbage, hold
    only their own slots: the others are answered at once, and the slow one is cut off at the deadline."""
    from agent import httpserve  # noqa: PLC0415

    monkeypatch.setattr(httpserve, "REQUEST_DEADLINE_S", 2.0)
    metrics = Metrics()
    metrics.observe(READY)
    server = MetricsServer(f"127.0.0.1:{free_port()}", metrics)
    server.start()
    url = f"http://127.0.0.1:{server.port}/metrics"
    try:
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /metr")
        garbage = socket.create_connection(("127.0.0.1", server.port))
        garbage.sendall(b"\x00\xff\r\n\r\n")
        started = time.monotonic()
        reply = requests.get(url, timeout=5)
        assert time.monotonic() - started < 1.0, "a slow client held up another"
        assert reply.status_code == 200 and reply.headers["Content-Type"].startswith("text/plain")
        families = {f.name for f in text_string_to_metric_families(reply.text)}
        assert {"nvidia_agent_ready", "nvidia_agent_phase", "nvidia_agent_driver_info"} <= families
        garbage.settimeout(5)
        answer = b"".join(iter(lambda: garbage.recv(4096), b""))
        assert b"400" in answer and b"Bad request" in answer, answer  # and the connection closed
        assert requests.get(f"http://127.0.0.1:{server.port}/other", timeout=5).status_code == 404
        slow.settimeout(10)
        for _ in range(4):  # a byte every half second: each read in time, the whole request not
            with contextlib.suppress(OSError):
                slow.sendall(b"i")
            time.sleep(0.5)
        assert slow.recv(1024) == b"", "the slow client was cut off at the deadline"
    finally:
        server.stop()


def test_the_sample_alert_rules_name_metrics_the_agent_exports() -> None:
    """packaging/prometheus/nvidia-agent.rules.yml: every metric an expression names exists, with its labels."""
    import yaml  # noqa: PLC0415 - the test group's

    rules = yaml.safe_load((REPO / "packaging/prometheus/nvidia-agent.rules.yml").read_text())["groups"][0]["rules"]
    metrics = Metrics()
    metrics.observe(READY)
    metrics.passed(Phase.DEGRADED, "ImageMissing", 1.0)
    exported = {s.name for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples}
    for rule in rules:
        names = set(re.findall(r"\bnvidia_agent_[a-z_]+", rule["expr"]))
        assert names and names <= exported, (rule["alert"], names - exported)
        assert rule["annotations"]["summary"]


def test_the_publisher_writes_the_spec_of_the_working_tree_and_takes_it_back(tmp_path: Path) -> None:
    """With a tree under a host root: the spec lists its lib64 files (links too, never one leading out) and
    tools; a degraded pass with no tree serving removes the spec and the markers; an unchanged pass
    writes nothing."""
    host = HostRoot(tmp_path)
    tree = tmp_path / TREE.lstrip("/")
    (tree / "lib64").mkdir(parents=True)
    (tree / "bin").mkdir()
    (tree / "lib64/libcuda.so.535.261.03").write_bytes(b"\x7fELF")
    (tree / "lib64/libcuda.so.1").symlink_to("libcuda.so.535.261.03")
    (tree / "lib64/libevil.so").symlink_to("/etc/shadow")
    (tree / "bin/nvidia-smi").write_bytes(b"\x7fELF")
    publisher = Publisher(host, textfile_dir="/prom", nfd_dir="/nfd", cdi_dir="/var/run/cdi",
                          operator_dir="/run/nvidia/validations", library_dir="/usr/lib64", metrics=Metrics())
    publisher.publish(READY, settled=True)
    spec = json.loads((tmp_path / "var/run/cdi/nvidia-agent.yaml").read_text())
    assert sorted(m["containerPath"] for m in spec["containerEdits"]["mounts"]) == [
        "/usr/bin/nvidia-smi", f"/usr/lib/{multiarch()}/libcuda.so.1", f"/usr/lib/{multiarch()}/libcuda.so.535.261.03",
        "/usr/lib64/libcuda.so.1", "/usr/lib64/libcuda.so.535.261.03"]
    assert cdi.validate(spec) == []
    assert (tmp_path / "run/nvidia/validations/driver-ready").read_text() == HOST_DRIVER_STATUS
    assert not (tmp_path / "prom").exists() and not (tmp_path / "nfd").exists(), "their readers are not set up"
    written = (tmp_path / "var/run/cdi/nvidia-agent.yaml").stat().st_mtime_ns
    publisher.publish(READY, settled=True)
    assert (tmp_path / "var/run/cdi/nvidia-agent.yaml").stat().st_mtime_ns == written, "unchanged: not rewritten"
    publisher.publish(replace(READY, phase=Phase.PULLING), settled=False)
    assert (tmp_path / "var/run/cdi/nvidia-agent.yaml").exists(), "a phase in the middle of a pass changes no file"
    publisher.publish(replace(READY, phase=Phase.DEGRADED), settled=True)
    assert not (tmp_path / "var/run/cdi/nvidia-agent.yaml").exists()
    assert not list((tmp_path / "run/nvidia/validations").iterdir())


def test_a_marker_the_validator_wrote_its_own_way_is_left_to_it(tmp_path: Path) -> None:
    """driver-ready holding other lines than the agent's (a driver container's validation) is not removed."""
    publisher = Publisher(HostRoot(tmp_path), textfile_dir="", nfd_dir="", cdi_dir="", operator_dir="/v",
                          library_dir="/usr/lib64", metrics=Metrics())
    theirs = b"IS_HOST_DRIVER=false\nNVIDIA_DRIVER_ROOT=/run/nvidia/driver\n"
    (tmp_path / "v").mkdir()
    (tmp_path / "v/driver-ready").write_bytes(theirs)
    publisher.publish(replace(READY, phase=Phase.DEGRADED), settled=True)
    assert (tmp_path / "v/driver-ready").read_bytes() == theirs
    publisher.publish(READY, settled=True)
    publisher.publish(replace(READY, phase=Phase.DEGRADED), settled=True)
    assert not (tmp_path / "v/driver-ready").exists(), "what it wrote itself goes"


def test_a_failing_export_directory_never_fails_the_publisher(tmp_path: Path) -> None:
    """The textfile's name is taken by a directory: a warning, and the rest is still written."""
    (tmp_path / "prom/nvidia-agent.prom").mkdir(parents=True)
    publisher = Publisher(HostRoot(tmp_path), textfile_dir="/prom", nfd_dir="", cdi_dir="/cdi", operator_dir="",
                          library_dir="/usr/lib64", metrics=Metrics())
    with capture_logs() as logs:
        publisher.publish(READY, settled=True)
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["export_not_written"]
    assert (tmp_path / "cdi/nvidia-agent.yaml").exists(), "the other files are still written"
