"""The agent under fire, end to end: a full disk, a misbehaving registry, a missing driver, TLS trust.

Each test runs the real agent process on a sandboxed host root (tests/support/sandbox.py) and
asserts what an operator would see: the exit status, the error and its hint, `status`, and that
the working driver stays current and mounted.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support.flaky_proxy import Fault, FlakyProxy, blobs, manifests
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, K2, REPO, Host, RunningAgent, push_driver, tag, tree_path

pytestmark = pytest.mark.integration
OLD = f"{DRIVER}/ubuntu-22.04-{K1}"


def layer_of(registry: RegistryServer, tag_name: str) -> str:
    """The digest of an image's one layer, read from the registry itself."""
    manifest = requests.get(f"{registry.url}/v2/{REPO}/manifests/{tag_name}", timeout=10,
                            headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).json()
    return str(manifest["layers"][0]["digest"])


def current_in_ns(host: Host) -> str:
    return host.in_ns("readlink", str(host.root / "opt/nvidia/current")).strip()


def test_a_full_disk_keeps_the_previous_driver_and_says_what_to_do(tmp_path: Path, registry: RegistryServer,
                                                                   host: Host) -> None:
    """/opt/nvidia on a 3 MiB filesystem: the first driver fits; the next kernel's (a 6 MB library of
    zeros: a small layer, so the check before the pull lets it through) fills the disk mid-extract.
    The agent reports ENOSPC with a hint, removes its staging directory, and the previous tree
    stays current and mounted."""
    host.in_ns("mkdir", "-p", str(host.root / "opt/nvidia"))
    host.in_ns("mount", "-t", "tmpfs", "-o", "size=3m", "nvidia-small", str(host.root / "opt/nvidia"))
    push_driver(tmp_path, registry.host, K1)
    assert host.once().returncode == 0
    push_driver(tmp_path, registry.host, K2, big_lib_bytes=6_000_000, compressible=True)
    host.set_kernel(K2)
    run = host.once()
    assert run.returncode == 2, run.stdout + run.stderr
    assert "No space left on device" in run.stdout
    assert "the filesystem is full" in run.stdout  # the hint
    assert "reconcile_crashed" not in run.stdout
    assert current_in_ns(host) == OLD
    assert host.in_ns("ls", "-A", str(host.root / "opt/nvidia")).split() == ["535.261.03", "current"]
    assert len(host.our_mounts()) == 1 and f"{tree_path(K1)}/lib64:" in host.our_mounts()[0]


def test_an_image_the_disk_cannot_hold_is_refused_before_the_pull(tmp_path: Path, registry: RegistryServer,
                                                                  host: Host) -> None:
    """The same small /opt/nvidia and an image whose layer alone (6 MB, incompressible) is bigger
    than the free space: refused before a byte of it is downloaded, naming the filesystem."""
    host.in_ns("mkdir", "-p", str(host.root / "opt/nvidia"))
    host.in_ns("mount", "-t", "tmpfs", "-o", "size=3m", "nvidia-small", str(host.root / "opt/nvidia"))
    push_driver(tmp_path, registry.host, K1)
    assert host.once().returncode == 0
    push_driver(tmp_path, registry.host, K2, big_lib_bytes=6_000_000)
    host.set_kernel(K2)
    run = host.once()
    assert run.returncode == 2, run.stdout + run.stderr
    assert "not enough free space: " in run.stdout and "the unpacked tree in" in run.stdout, run.stdout
    assert " pulling " not in run.stdout, "refused before the pull"
    assert not list((host.root / "var/cache/nvidia-agent/blobs").rglob("*.partial"))
    assert current_in_ns(host) == OLD


def test_a_registry_storm_is_retried_and_a_cut_download_resumed(tmp_path: Path, registry: RegistryServer,
                                                                host: Host) -> None:
    """Three 503s with Retry-After on the manifest, then a connection reset in the middle of the layer:
    bounded retries, the download resumes where it stopped (Range), and the install is complete."""
    push_driver(tmp_path, registry.host, K1, big_lib_bytes=1_500_000)
    layer_digest = layer_of(registry, tag(K1))
    faults = (Fault.storm(503, retry_after=1, when=manifests, times=3),
              Fault.reset(after_bytes=800_000, when=lambda _m, path: path.endswith(layer_digest), times=1))
    with FlakyProxy(registry.host, faults=faults) as proxy:
        host.configure(proxy.host)
        run = host.once()
        assert run.returncode == 0, run.stdout + run.stderr
        layer = [s for s in proxy.seen if blobs(s.method, s.path) and s.sent_bytes > 100_000]
    assert run.stdout.count("registry_retry") == 4, run.stdout  # three for the storm, one for the reset
    assert "blob_resumed" in run.stdout
    assert layer[-1].status == 206 and layer[-1].range is not None
    assert host.current() == OLD


def test_a_blackholed_registry_times_out_boundedly_and_status_says_so(tmp_path: Path, registry: RegistryServer,
                                                                      host: Host) -> None:
    """A registry that accepts and never answers: each request times out, the attempts are bounded, the
    pass fails with 'unreachable'/'timed out' in status and journal, and once the registry heals the
    running daemon installs without a restart."""
    push_driver(tmp_path, registry.host, K1)
    with FlakyProxy(registry.host, faults=(Fault.blackhole(),)) as proxy:
        host.configure(proxy.host, image="timeout_s = 1.0\nattempts = 2\n")
        with RunningAgent(host) as agent:
            deadline = time.monotonic() + 60
            status: dict[str, object] = {}
            while time.monotonic() < deadline:
                status = agent.status_json()
                if status.get("last_error"):
                    break
                time.sleep(0.2)
            error = status["last_error"]
            assert isinstance(error, dict), status
            assert "gave up after 2 attempts" in error["message"], error
            assert "timed out" in error["message"].lower() or "unreachable" in error["message"], error
            assert status["current"] is None
            proxy.plan()  # the registry heals
            healed = agent.status_json(wait_s=60)
            code, log = agent.stop()
    assert healed["phase"] == "ready", healed
    assert code == 0
    assert "registry_retry" in log


def test_a_slow_drip_completes_and_status_shows_the_pull(tmp_path: Path, registry: RegistryServer,
                                                         host: Host) -> None:
    """A layer trickling at 200 KB/s: status says `pulling` while it comes, and the install completes."""
    push_driver(tmp_path, registry.host, K1, big_lib_bytes=600_000)
    with FlakyProxy(registry.host, faults=(Fault.drip(bytes_per_s=200_000, when=blobs),)) as proxy, \
            RunningAgent(host) as agent:
        host.configure(proxy.host)
        phases = set()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            status = agent.status_json()
            phases.add(status.get("phase"))
            if status.get("phase") == "ready":
                break
            time.sleep(0.2)
        agent.stop()
    assert "pulling" in phases and "ready" in phases, phases


class NotifySocket:
    """systemd's notify socket, drained as PID 1 drains it, for the agent to send READY= and STATUS= to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[dict[str, str]] = []
        self.closed = False
        self.reader = threading.Thread(target=self._drain, daemon=True)
        self.reader.start()

    def _drain(self) -> None:
        while not self.closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            self.received.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def messages(self) -> list[dict[str, str]]:
        self.closed = True
        self.reader.join(5)
        return self.received


def test_a_new_driver_without_an_image_keeps_the_old_one_serving(tmp_path: Path, registry: RegistryServer,
                                                                 host: Host) -> None:
    """driver.version moves to a release nobody published for this kernel: the installed tree keeps
    working (current, mounted), READY=1 goes out with a degraded status naming it, and status says
    `degraded` with `serving` until the new image exists, through every retry pass too (a registry
    answering 503 with Retry-After keeps each pass in flight long enough to be seen)."""
    push_driver(tmp_path, registry.host, K1)
    assert host.once().returncode == 0
    with FlakyProxy(registry.host, faults=(Fault.storm(503, retry_after=1, when=manifests),)) as proxy:
        host.configure(proxy.host, '[driver]\nversion = "550.54.14"\n')
        notify = NotifySocket(tmp_path / "notify")
        with RunningAgent(host, env={"NOTIFY_SOCKET": str(notify.path)}) as agent:
            deadline = time.monotonic() + 60
            status: dict[str, object] = {}
            while time.monotonic() < deadline and not (status.get("serving") and status["phase"] == "degraded"):
                status = agent.status_json()
                text = agent.status().stdout
                time.sleep(0.1)
            # the retries that follow (every <= 2 s here) re-check the tree: it is served through them
            later: list[dict[str, object]] = []
            while time.monotonic() < deadline and len({s["last_reconcile_at"] for s in later}) < 3:
                later.append(agent.status_json())
                time.sleep(0.05)
            agent.stop()
    assert status["phase"] == "degraded" and status["serving"] == tree_path(K1), status
    assert status["current"] == tree_path(K1)
    assert "serving:     " + tree_path(K1) in text
    assert {s["phase"] for s in later} - {"degraded"}, "no retry pass was seen in flight"
    assert all(s["serving"] == tree_path(K1) for s in later), [s for s in later if not s["serving"]]
    ready = [m for m in notify.messages() if m.get("READY") == "1"]
    assert len(ready) == 1 and ready[0]["STATUS"].startswith(f"degraded: serving {tree_path(K1)}"), ready
    assert len(host.our_mounts()) == 1 and f"{tree_path(K1)}/lib64:" in host.our_mounts()[0]


@pytest.fixture
def tls_registry(tmp_path: Path, tools: None) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path / "tls-registry", tls=True) as server:
        yield server


@pytest.mark.parametrize("trust", ["none", "host-store", "ca_file"])
def test_https_is_verified_against_the_host_store_and_ca_file(tmp_path: Path, tls_registry: RegistryServer,
                                                              host: Host, trust: str) -> None:
    """An https registry with a private CA: refused with a clear hint until the CA is in the host's own
    store (found under the host root) or in image.ca_file; certifi's bundle alone never trusts it."""
    push_driver(tmp_path, tls_registry.host, K1)
    assert tls_registry.ca_file is not None
    ca = tls_registry.ca_file.read_text()
    extra = ""
    if trust == "host-store":
        (host.root / "etc/ssl/certs").mkdir(parents=True)
        (host.root / "etc/ssl/certs/ca-certificates.crt").write_text(ca)
    elif trust == "ca_file":
        (host.root / "etc/nvidia-agent/registry-ca.pem").write_text(ca)
        extra = 'ca_file = "/etc/nvidia-agent/registry-ca.pem"\n'
    host.configure(tls_registry.host, image=extra, plain_http=False)
    run = host.once()
    if trust == "none":
        assert run.returncode == 2, run.stdout + run.stderr
        assert "TLS certificate not trusted" in run.stdout
        assert "install the registry's CA" in run.stdout
    else:
        assert run.returncode == 0, run.stdout + run.stderr
        assert host.current() == OLD


def test_an_unconfigured_agent_says_what_to_set(host: Host) -> None:
    """No registry configured: nothing is trusted by default; the agent exits 78 naming the key."""
    (host.root / "etc/nvidia-agent/config.d/50-test.toml").unlink()
    run = host.once()
    assert run.returncode == 78
    assert "image.registry" in run.stderr and "50-registry.toml" in run.stderr
    assert json.loads(host.agent("config").stdout)["image"]["registry"] == ""
