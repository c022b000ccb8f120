"""`nvidia-agent preflight`: an image for another OS version and kernel, checked against a real
registry the way an install checks it, and nothing on the host changed."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.registry import RegistryServer
from support.sandbox import K1, K2, Host, push_driver

pytestmark = pytest.mark.integration

NEXT_KERNEL = K2


def host_untouched(host: Host) -> None:
    assert not (host.root / "opt/nvidia").exists(), "preflight installed something"
    assert not list((host.root / "var/tmp").iterdir()), "preflight left its scratch directory"


def test_an_image_that_exists_and_verifies(tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    digest = push_driver(tmp_path, registry.host, NEXT_KERNEL)
    (host.root / "var/tmp").mkdir(parents=True)
    out = host.agent("preflight", "--os-version", "22.04", "--kernel", NEXT_KERNEL)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith(f"ok: {registry.host}/nvidia/driver:535.261.03-ubuntu-22.04-{NEXT_KERNEL} "
                                 f"({digest}) verifies for kernel {NEXT_KERNEL}: nvidia"), out.stdout
    host_untouched(host)


def test_no_image_for_that_kernel(tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    push_driver(tmp_path, registry.host, K1)
    (host.root / "var/tmp").mkdir(parents=True)
    out = host.agent("preflight", "--os-version", "22.04", "--kernel", NEXT_KERNEL)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"preflight failed for 22.04 / {NEXT_KERNEL}" in out.stderr
    assert f"ubuntu-22.04-{NEXT_KERNEL}" in out.stderr, out.stderr
    host_untouched(host)


def test_an_image_built_for_another_kernel_is_rejected(tmp_path: Path, registry: RegistryServer,
                                                        host: Host) -> None:
    """Tagged for the next kernel, but its modules were built for the running one: vermagic says no."""
    push_driver(tmp_path, registry.host, K1, tag_kernel=NEXT_KERNEL)
    (host.root / "var/tmp").mkdir(parents=True)
    out = host.agent("preflight", "--os-version", "22.04", "--kernel", NEXT_KERNEL)
    assert out.returncode == 1, out.stdout + out.stderr
    assert NEXT_KERNEL in out.stderr and K1 in out.stderr, out.stderr
    host_untouched(host)


def test_a_workdir_that_cannot_be_written_says_so(tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    push_driver(tmp_path, registry.host, NEXT_KERNEL)
    out = host.agent("preflight", "--os-version", "22.04", "--kernel", NEXT_KERNEL, "--workdir", "/nonexistent")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "cannot make a scratch directory" in out.stderr and "--workdir" in out.stderr, out.stderr
