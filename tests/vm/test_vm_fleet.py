"""VM tier, issue 11: what the fleet reads, with the real consumers where one runs in the guest.

Debian's podman 4.3 runs a container with `--device nvidia.com/gpu=all` from the CDI spec the agent
wrote, and sees the GPU nodes and the driver's libraries; the node_exporter textfile, NFD's feature
file, the GPU operator's markers and the spec follow readiness: present on the first boot, gone (or
saying false) on a boot into another kernel while no image for it can be had, back (the spec naming
the new tree) once the registry is there again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm.harness import DRIVER, Guest
from tests.vm.test_vm import artifacts_dir, assert_serving, fresh_guest, settle, tree_for

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.timeout(1500)]

SPEC = "/var/run/cdi/nvidia-agent.yaml"
NFD = "/etc/kubernetes/node-feature-discovery/features.d/nvidia-agent"
PROM = "/var/lib/node_exporter/textfile_collector/nvidia-agent.prom"
MARKERS = "/run/nvidia/validations"
PODMAN = "podman run --rm --network none --device nvidia.com/gpu=all localhost/probe"


@pytest.fixture(scope="module")
def artifacts() -> Path:
    return artifacts_dir("-fleet")


@pytest.fixture
def vm(artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    yield from fresh_guest(artifacts, request)


def read(g: Guest, path: str) -> str | None:
    rc, out = g.run(f"cat {path}", quiet=True)
    return out if rc == 0 else None


def container_sees(g: Guest, kernel: str) -> str:
    rc, out = g.run(f"{PODMAN} ls -l /dev/nvidia0 /dev/nvidia1 /dev/nvidiactl /usr/lib64/libnvidia-ml.so.1 "
                    "/usr/lib/x86_64-linux-gnu/libnvidia-ml.so.1 "
                    "/usr/bin/nvidia-smi", timeout=300)
    assert rc == 0, f"podman with the CDI spec failed on {kernel}: {out}"
    return out


def test_podman_gets_the_gpus_from_the_cdi_spec_and_the_fleet_files_follow_readiness(vm: Guest) -> None:
    g = vm
    amd64, cloud = g.kernels.amd64, g.kernels.cloud
    assert_serving(g, settle(g), DRIVER, amd64)
    spec = json.loads(read(g, SPEC) or "{}")
    assert spec.get("kind") == "nvidia.com/gpu" and spec.get("cdiVersion") == "0.5.0", spec
    assert [d["name"] for d in spec["devices"]] == ["0", "1", "all"], spec["devices"]
    mounts = [m["hostPath"] for m in spec["containerEdits"]["mounts"]]
    assert mounts and all(m.startswith(f"/opt/nvidia/{tree_for(DRIVER, amd64)}/") for m in mounts), mounts
    assert "nvidia-agent.ready=true" in (read(g, NFD) or "")
    assert "nvidia_agent_ready 1.0" in (read(g, PROM) or "")
    assert (read(g, f"{MARKERS}/driver-ready") or "").startswith("IS_HOST_DRIVER=true")

    g.run("podman import --quiet /usr/lib/nvidia-agent-vm/probe.tar localhost/probe", check=True, timeout=300)
    seen = container_sees(g, amd64)
    assert "/dev/nvidia0" in seen and "/dev/nvidiactl" in seen and "libnvidia-ml.so.1" in seen, seen
    rc, out = g.run(f"{PODMAN.replace('gpu=all', 'gpu=1')} ls /dev/nvidia0", quiet=True, timeout=300)
    assert rc != 0, f"device 1 alone must not bring /dev/nvidia0: {out}"

    # A kernel with no tree, and no registry to get one from: nothing works, and nothing says it does.
    g.run("systemctl disable --now docker-registry", check=True)
    g.reboot(kernel="cloud")  # not waiting for `active`: READY comes only at daemon.ready_timeout_s here
    st = settle(g, want="degraded")
    assert st["kernel"] == cloud and not st.get("serving"), st
    # (/run is new at every boot: that these are absent shows the agent did not write them now)
    assert read(g, SPEC) is None, "no spec while no driver works"
    assert read(g, f"{MARKERS}/driver-ready") is None and read(g, f"{MARKERS}/host-driver-ready") is None
    assert "nvidia-agent.ready=false" in (read(g, NFD) or ""), read(g, NFD)
    assert "nvidia_agent_ready 0.0" in (read(g, PROM) or "")

    g.run("systemctl enable --now docker-registry", check=True)
    t = g.guest_time()
    g.run("systemctl reload nvidia-agent", check=True)
    assert_serving(g, settle(g, since=t), DRIVER, cloud)
    spec = json.loads(read(g, SPEC) or "{}")
    mounts = [m["hostPath"] for m in spec["containerEdits"]["mounts"]]
    assert mounts and all(m.startswith(f"/opt/nvidia/{tree_for(DRIVER, cloud)}/") for m in mounts), mounts
    assert "nvidia-agent.ready=true" in (read(g, NFD) or "")
    assert (read(g, f"{MARKERS}/driver-ready") or "").startswith("IS_HOST_DRIVER=true")
    container_sees(g, cloud)
