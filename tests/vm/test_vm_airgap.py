"""VM tier, issue 10: an air-gapped host, READY from an imported archive with no registry at all.

The guest boots as every scenario does (its driver from the registry inside it); then the
registry is disabled and stopped, the installed trees and the blob cache are removed, and the
driver image arrives as a file: an oci-archive that skopeo made on this host from the same
registry content, copied into the guest. `nvidia-agent import` takes it; the guest reboots and
the agent, run by systemd with no registry to ask, installs the imported image, loads its
modules and tells systemd READY.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.vm import harness
from tests.vm.harness import DRIVER, GUEST_REGISTRY, Guest
from tests.vm.test_vm import artifacts_dir, assert_serving, fresh_guest, pulled, settle

pytestmark = [pytest.mark.vm, pytest.mark.integration, pytest.mark.timeout(1200)]

CHUNK_BYTES = 4 << 20  # one guest-exec's stdin at a time


@pytest.fixture(scope="module")
def artifacts() -> Path:
    return artifacts_dir("-airgap")


@pytest.fixture
def vm(artifacts: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    yield from fresh_guest(artifacts, request)


def oci_archive(kernel: str, dest: Path) -> str:
    """skopeo copies the guest's driver image for `kernel` from the registry content the guest image was filled
    with (served on this host from a copy) into an oci-archive; the image's name."""
    bt = harness._build_trees_module()
    tag = bt.image_tag(DRIVER, kernel)
    images = harness.driver_images(harness.current_image()[1])
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp) / "registry"
        shutil.copytree(images / "registry", storage, symlinks=True)
        with harness.host_registry(storage) as host:
            subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                            f"docker://{host}/{bt.REPOSITORY}:{tag}", f"oci-archive:{dest}:{tag}"],
                           check=True, timeout=300)
    return f"{GUEST_REGISTRY}/{bt.REPOSITORY}:{tag}"


def copy_in(g: Guest, local: Path, remote: str) -> None:
    data = local.read_bytes()
    g.run(f"rm -f {remote}", check=True)
    for at in range(0, len(data), CHUNK_BYTES):
        g.run(f"cat >> {remote}", check=True, quiet=True, input_data=data[at:at + CHUNK_BYTES])
    rc, out = g.run(f"stat -c %s {remote}", quiet=True)
    assert (rc, out.strip()) == (0, str(len(data))), out


def test_an_air_gapped_host_is_ready_from_an_imported_archive(vm: Guest, tmp_path: Path) -> None:
    g = vm
    archive = tmp_path / "driver.oci.tar"
    name = oci_archive(g.kernel, archive)
    harness.log(f"archive {archive.stat().st_size} bytes for {name}")

    g.run("systemctl disable --now docker-registry", check=True)  # no registry, ever again
    g.run("systemctl stop nvidia-agent", check=True)
    g.run("rm -rf /opt/nvidia/* /var/cache/nvidia-agent/blobs", check=True)  # nothing installed or cached
    copy_in(g, archive, "/var/tmp/driver.oci.tar")
    rc, out = g.run("nvidia-agent import /var/tmp/driver.oci.tar")
    assert rc == 0 and f"imported {name} (sha256:" in out, out
    rc, out = g.run("nvidia-agent import --list", quiet=True)
    assert out.startswith(f"{name}  sha256:"), out

    g.reboot()
    g.wait_agent_active()
    st = settle(g)
    assert_serving(g, st, DRIVER, g.kernel)
    _, journal = g.run("journalctl -u nvidia-agent -b --no-pager -o cat", quiet=True)
    assert any("image_source" in line and "source=imported" in line for line in journal.splitlines()), journal
    assert len(pulled(journal)) == 1, "one install, from the imported image"
    rc, _ = g.run(f"python3 -c \"import urllib.request as u; u.urlopen('http://{GUEST_REGISTRY}/v2/', timeout=3)\"",
                  quiet=True)
    assert rc != 0, "the registry answered: this scenario is not air-gapped"
