"""What fleet tools read (issue 11): the node_exporter textfile, read back with prometheus-client's own parser,
NFD's feature file and the GPU operator's markers, through ready -> degraded -> ready of a running daemon
(a kernel change with no image for it yet, then the image pushed)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_faults import NotifySocket

from support.flaky_proxy import Fault, FlakyProxy, blobs
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, K2, REPO_ROOT, Host, RunningAgent, push_driver

pytestmark = [pytest.mark.integration, pytest.mark.subprocess]

TEXTFILE = "var/lib/node_exporter/textfile_collector/nvidia-agent.prom"
NFD = "etc/kubernetes/node-feature-discovery/features.d/nvidia-agent"
MARKERS = "run/nvidia/validations"


def samples(host: Host) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = (host.root / TEXTFILE).read_text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), float("nan"))


def phase_of(agent: RunningAgent) -> str:
    return str(agent.status_json().get("phase", ""))


def hup_until(agent: RunningAgent, host: Host, want: str, timeout_s: float = 60) -> None:
    lock = host.root / "run/nvidia-agent/agent.lock"
    os.kill(int(lock.read_text()), signal.SIGHUP)
    deadline = time.monotonic() + timeout_s
    while phase_of(agent) != want:
        assert time.monotonic() < deadline, f"not {want}: {agent.status_json()}"
        time.sleep(0.3)
    time.sleep(0.5)  # the pass ends (files written) just after the phase shows


def test_metrics_features_and_markers_follow_ready_degraded_ready(tmp_path: Path, registry: RegistryServer,
                                                                   host: Host) -> None:
    push_driver(tmp_path, registry.host, K1)
    for d in (Path(TEXTFILE).parent, Path(NFD).parent):
        (host.root / d).mkdir(parents=True)  # node_exporter and NFD are set up on this host
    with RunningAgent(host) as agent:
        assert agent.status("--wait", "60").returncode == 0
        time.sleep(0.5)
        found = samples(host)
        assert value(found, "nvidia_agent_ready") == 1
        assert value(found, "nvidia_agent_phase", nvidia_agent_phase="ready") == 1
        assert value(found, "nvidia_agent_driver_info", driver=DRIVER, os_key=f"ubuntu-22.04-{K1}", kernel=K1,
                     digest=str(agent.status_json()["digest"])) == 1
        assert value(found, "nvidia_agent_install_duration_seconds_count") == 1
        assert value(found, "nvidia_agent_pulled_bytes_total", source="registry") > 0
        assert value(found, "nvidia_agent_last_success_timestamp_seconds") > time.time() - 120
        assert value(found, "nvidia_agent_next_boot", nvidia_agent_next_boot="none") == 1
        nfd = (host.root / NFD).read_text()
        assert f"nvidia-agent.driver-version={DRIVER}\n" in nfd and "nvidia-agent.ready=true\n" in nfd
        assert (host.root / MARKERS / "driver-ready").read_text().startswith("IS_HOST_DRIVER=true\n")
        assert (host.root / MARKERS / "host-driver-ready").exists()

        host.set_kernel(K2)  # a kernel with no image yet: nothing works for it
        hup_until(agent, host, "degraded")
        found = samples(host)
        assert value(found, "nvidia_agent_ready") == 0
        assert value(found, "nvidia_agent_phase", nvidia_agent_phase="degraded") == 1
        assert value(found, "nvidia_agent_errors_total", kind="ImageMissing") >= 1
        assert value(found, "nvidia_agent_reconciles_total", outcome="degraded") >= 1
        assert "nvidia-agent.ready=false\n" in (host.root / NFD).read_text()
        assert not list((host.root / MARKERS).iterdir()), "no markers while nothing works"
        events = agent.status("--events").stdout
        assert "degraded" in events and "ImageMissing" not in events and "no image" in events, events

        push_driver(tmp_path, registry.host, K2)
        hup_until(agent, host, "ready")
        found = samples(host)
        assert value(found, "nvidia_agent_ready") == 1
        assert value(found, "nvidia_agent_install_duration_seconds_count") == 2
        assert value(found, "nvidia_agent_reconciles_total", outcome="ready") >= 2
        assert any(name == "nvidia_agent_driver_info" and dict(labels).get("kernel") == K2
                   for (name, labels) in found), found
        assert (host.root / MARKERS / "driver-ready").exists()
        assert "nvidia-agent.ready=true\n" in (host.root / NFD).read_text()
        code, _ = agent.stop()
        assert code == 0


def test_a_slow_pull_shows_its_progress_in_status_in_systemd_and_on_a_terminal(tmp_path: Path,
                                                                               registry: RegistryServer,
                                                                               host: Host) -> None:
    """A registry throttled to 256 KiB/s (a loopback proxy) and a 3 MiB layer: `status --json` shows the bytes
    rising with a rate and a time left that fit the throttle, STATUS= carries the percentage, and
    `status --wait` in a terminal (tmux) draws the live line."""
    push_driver(tmp_path, registry.host, K1, big_lib_bytes=3 << 20)
    notify = NotifySocket(tmp_path / "notify")
    session = f"nvidia-agent-{os.getpid()}"
    with FlakyProxy(registry.host, faults=(Fault.drip(bytes_per_s=256 << 10, when=blobs),)) as proxy:
        host.configure(proxy.host)
        with RunningAgent(host, env={"NOTIFY_SOCKET": str(notify.path)}) as agent:
            subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "10",
                            f"cd {REPO_ROOT} && {sys.executable} -m agent --root {host.root} status --wait 120; "
                            "sleep 60"], check=True)
            try:
                seen: list[dict[str, object]] = []
                panes: list[str] = []
                deadline = time.monotonic() + 90
                while time.monotonic() < deadline and phase_of(agent) != "ready":
                    progress = agent.status_json().get("progress")
                    if isinstance(progress, dict):
                        seen.append(progress)
                    panes.append(subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                                text=True, check=False).stdout)
                    time.sleep(0.5)
            finally:
                subprocess.run(["tmux", "kill-session", "-t", session], check=False)
            agent.stop()
    received = notify.messages()
    done = [int(str(p["done_bytes"])) for p in seen]
    assert len(done) >= 4 and done == sorted(done) and done[-1] > done[0], seen
    assert all(p["total_bytes"] == seen[0]["total_bytes"] for p in seen)
    rates = [float(str(p["rate_bps"])) for p in seen if p.get("rate_bps")]
    assert rates and all(64 << 10 < r < 1 << 20 for r in rates[1:]), rates  # about the throttle's 256 KiB/s
    etas = [float(str(p["eta_s"])) for p in seen if p.get("eta_s") is not None]
    assert etas and etas[-1] < etas[0] and max(etas) < 60, etas
    statuses = [m["STATUS"] for m in received if m.get("STATUS", "").startswith("pulling: ")]
    assert any(re.match(r"pulling: \d+% \d+/\d+ MiB, [\d.]+ MiB/s", s) for s in statuses), statuses
    assert any(re.search(r"pulling: \d+% \d+/\d+ MiB", pane) for pane in panes), panes[-3:]
