"""The docker engine as an image source (issue 10), against a real dockerd of the test's own.

The agent asks the engine over its socket (a link at the host root's /run/docker.sock), reads
the image from the archive the engine exports, checks every layer against the config's
diff_ids and installs it: pulled by the engine from the test registry, or only `docker load`ed
with the registry stopped.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from agent.fetch.engine import EngineSource
from agent.fetch.store import BlobStore
from agent.modules import module_holders
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


def test_an_image_docker_saved_imports_and_installs_offline(tmp_path: Path, registry: RegistryServer, host: Host,
                                                            engine: Engine) -> None:  # noqa: F811
    """`docker save` of an image the engine pulled (the engine's own archive writer), imported with the registry
    stopped and the engine not asked (image.source = registry): installed from the import."""
    push_driver(tmp_path, registry.host, K1)
    name = f"{registry.host}/{REPO}:{tag(K1)}"
    assert engine.client is not None
    image = engine.client.images.pull(name)
    archive = tmp_path / "saved.tar"
    with archive.open("wb") as out:
        for chunk in image.save(named=True):
            out.write(chunk)
    engine.client.images.remove(name, force=True)
    registry.stop()
    host.configure(registry.host, image='attempts = 1\nsource = "registry"\n')
    out = host.agent("import", str(archive))
    assert out.returncode == 0 and f"imported {name} (sha256:" in out.stdout, out.stdout + out.stderr
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "source=imported" in run.stdout, run.stdout
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"


def test_busy_modules_name_the_container_that_holds_the_gpu(tmp_path: Path, engine: Engine) -> None:  # noqa: F811
    """A real container (busybox, --network none): its process's real /proc/PID/cgroup gives the ID, the engine
    its name. The process is given /dev/nvidia0 in a host root of the test's own (there is no GPU here)."""
    assert engine.client is not None
    rootfs = tmp_path / "probe.tar"
    with tarfile.open(rootfs, "w") as tar:
        tar.add("/bin/busybox", arcname="bin/busybox")
    engine.client.api.import_image(src=str(rootfs), repository="nvidia-agent-probe", tag="1")
    container = engine.client.containers.run("nvidia-agent-probe:1", ["/bin/busybox", "sleep", "300"], detach=True,
                                             network_mode="none", name=f"trainer-{os.getpid()}")
    try:
        container.reload()
        pid = int(container.attrs["State"]["Pid"])
        root = tmp_path / "host"
        (root / "sys/module/nvidia/holders").mkdir(parents=True)
        (root / "sys/module/nvidia/refcnt").write_text("1\n")
        (root / f"proc/{pid}/fd").mkdir(parents=True)
        (root / f"proc/{pid}/fd/3").symlink_to("/dev/nvidia0")
        (root / f"proc/{pid}/comm").write_text("sleep\n")
        (root / f"proc/{pid}/cgroup").write_text(Path(f"/proc/{pid}/cgroup").read_text())
        names = EngineSource(engine.socket, BlobStore(tmp_path / "cache"), pull=False).container_names
        busy = module_holders(root / "sys/module", root / "proc", ("nvidia",), containers=names)
        assert busy == ["nvidia refcount 1",
                        f"pid {pid} (sleep) /dev/nvidia0 in container trainer-{os.getpid()} ({container.id[:12]})"]
    finally:
        container.remove(force=True)
        engine.client.images.remove("nvidia-agent-probe:1", force=True)
