"""The docker engine as an image source (issue 10), against a real dockerd of the test's own.

The agent asks the engine over its socket (a link at the host root's /run/docker.sock), reads
the image from the archive the engine exports, checks every layer against the config's
diff_ids and installs it: pulled by the engine from the test registry, or only `docker load`ed
with the registry stopped.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from support.engine import Engine, engine  # noqa: F401 - the fixture
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, REPO, Host, push_driver, tag, tree_path

pytestmark = [pytest.mark.integration, pytest.mark.subprocess]


def link_socket(host: Host, running: Engine) -> None:
    link = host.root / "run/docker.sock"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(running.socket)


def test_the_engine_pulls_and_the_agent_installs_from_its_export(tmp_path: Path, registry: RegistryServer,
                                                                 host: Host, engine: Engine) -> None:  # noqa: F811
    """image.source = engine: the engine pulls (its own registry access), the agent never asks the registry
    for a blob, and the engine's copy stays the only one kept."""
    push_driver(tmp_path, registry.host, K1)
    name = f"{registry.host}/{REPO}:{tag(K1)}"
    link_socket(host, engine)
    host.configure(registry.host, image='source = "engine"\n')
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "engine_pull" in run.stdout and "source=engine" in run.stdout, run.stdout
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
    assert (host.root / tree_path(K1).lstrip("/") / "lib64").is_dir()
    assert engine.client is not None and engine.client.images.get(name).id.startswith("sha256:")
    blobs = host.root / "var/cache/nvidia-agent/blobs/sha256"
    assert not blobs.exists() or not list(blobs.iterdir()), "the export's blobs leave the store once installed"
    assert not engine.client.containers.list(all=True), "no container was created"
    engine.client.images.remove(name, force=True)


def test_a_loaded_image_installs_with_the_registry_stopped(tmp_path: Path, registry: RegistryServer,
                                                           host: Host, engine: Engine) -> None:  # noqa: F811
    """image.source = auto: the engine has the image (docker load of an archive skopeo made), the registry
    is gone; the agent installs what the engine has."""
    push_driver(tmp_path, registry.host, K1)
    name = f"{registry.host}/{REPO}:{tag(K1)}"
    archive = tmp_path / "image.docker.tar"
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{name}",
                    f"docker-archive:{archive}:{name}"], check=True, timeout=120)
    registry.stop()
    assert engine.client is not None
    engine.client.images.load(archive.read_bytes())
    link_socket(host, engine)
    host.configure(registry.host, image="attempts = 1\n")
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "source=engine" in run.stdout, run.stdout
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
    engine.client.images.remove(name, force=True)


def test_without_the_image_auto_falls_through_to_the_registry(tmp_path: Path, registry: RegistryServer,
                                                              host: Host, engine: Engine) -> None:  # noqa: F811
    push_driver(tmp_path, registry.host, K1)
    link_socket(host, engine)
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "source=engine" not in run.stdout and "engine_pull" not in run.stdout
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
