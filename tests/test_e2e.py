"""End to end on a sandboxed host root: a real registry, images built by umoci/skopeo or by hand,
the agent as a real process in its own mount namespace with a real overlay, GPUs presented by umockdev.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from support.flaky_proxy import FlakyProxy, blobs, manifests
from support.images import push_hostile_image, push_index
from support.registry import RegistryServer
from support.sandbox import (
    DRIVER,
    K1,
    K2,
    REPO,
    Host,
    RunningAgent,
    push_driver,
    status_json,
    tag,
    tree_path,
    write,
)

pytestmark = pytest.mark.integration


def test_first_run_installs_mounts_and_reports_then_runs_offline(tmp_path: Path, registry: RegistryServer,
                                                                 host: Host) -> None:
    """First run pulls, installs, points current, overlays lib64; an unchanged rerun needs no registry."""
    digest = push_driver(tmp_path, registry.host, K1)
    (host.root / "var/usrlocal").mkdir(parents=True)
    (host.root / "usr/local").symlink_to("/var/usrlocal")  # as on Fedora CoreOS: absolute, the host's own /var
    first = host.once()
    assert first.returncode == 0, first.stdout + first.stderr
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
    tree = host.root / tree_path(K1).lstrip("/")
    assert (tree / "manifest.json").is_file()
    assert (tree / f"lib/modules/{K1}/nvidia.ko").is_file()
    for phase in ("resolving", "pulling", "verifying", "installing", "mounting", "ready"):
        assert f" {phase}" in first.stdout, phase
    # The overlay: the driver's libraries and the host's own, both under /usr/lib64, only in our namespace.
    libs = host.in_ns("ls", str(host.root / "usr/lib64")).split()
    assert f"libcuda.so.{DRIVER}" in libs
    assert "libhost.so.1" in libs
    assert "libcuda.so.1" in libs
    assert f"libcuda.so.{DRIVER}" not in os.listdir(host.root / "usr/lib64")
    assert len(host.our_mounts()) == 1
    assert (host.root / "etc/ld.so.cache").is_file()
    # The tools: linked through `current` on PATH (install.bin_dir "auto" is /usr/local/bin on Ubuntu),
    # its symlinks followed on the host root, never out of it
    assert os.readlink(host.root / "var/usrlocal/bin/nvidia-smi") == "/opt/nvidia/current/bin/nvidia-smi"
    assert "tools_linked" in first.stdout

    status = status_json(host)
    assert status["phase"] == "ready"
    assert status["digest"] == digest
    assert status["install_path"] == tree_path(K1)
    assert status["current"] == tree_path(K1)
    assert status["kernel"] == K1
    assert status["mount"] == f"{tree_path(K1)}/lib64 over /usr/lib64"
    assert len(status["gpus"]) == 2  # type: ignore[arg-type]

    registry.stop()
    again = host.once(env={"PYTHONPROFILEIMPORTTIME": "1"})  # python -X importtime: every import, on stderr
    assert again.returncode == 0, again.stdout + again.stderr
    assert "pulling" not in again.stdout
    # an unchanged boot imports none of the change path (issue 12: each costs the boot tens of ms and MiBs)
    imported = {line.rsplit("|", 1)[1].strip() for line in again.stderr.splitlines() if line.startswith("import time:")}
    assert "agent.reconcile" in imported  # the profile was taken
    heavy = {"requests", "urllib3", "prometheus_client", "cryptography", "docker", "isal",
             "agent.fetch.registry", "agent.fetch.sources", "agent.install.image", "agent.install.layers"}
    assert not heavy & imported, sorted(heavy & imported)
    assert len(host.our_mounts()) == 1, "an unchanged run must not stack another overlay"
    assert "tools_linked" not in again.stdout  # in place: not touched again


def test_kernel_change_installs_the_matching_image_and_keeps_the_old_tree(tmp_path: Path, registry: RegistryServer,
                                                                          host: Host) -> None:
    """After the host boots another kernel, the agent installs that kernel's image and switches current."""
    push_driver(tmp_path, registry.host, K1)
    assert host.once().returncode == 0
    new_digest = push_driver(tmp_path, registry.host, K2)
    host.set_kernel(K2)
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "kernel_changed" in run.stdout and f"previous={K1}" in run.stdout
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K2}"
    assert (host.root / tree_path(K1).lstrip("/") / "manifest.json").is_file(), "old tree kept"
    mounts = host.our_mounts()
    assert len(mounts) == 1
    assert f"lowerdir={host.root}{tree_path(K2)}/lib64:" in mounts[0]
    marker = json.loads((host.root / tree_path(K2).lstrip("/") / ".nvidia-agent.json").read_text())
    assert marker["digest"] == new_digest

    status = status_json(host)
    assert status["kernel"] == K2
    assert status["kernel_changed_from"] == K1, "status keeps saying what the kernel changed from once ready"

    host.configure(registry.host, "[install]\nkeep_trees = 1\n")
    kept = host.once()
    assert kept.returncode == 0, kept.stdout + kept.stderr
    assert "pruned" not in kept.stdout, "the previous boot's tree stays whatever keep_trees says"
    assert (host.root / tree_path(K1).lstrip("/") / "manifest.json").is_file()
    assert (host.root / tree_path(K2).lstrip("/") / "manifest.json").is_file()
    assert host.debris() == []


@pytest.mark.parametrize("kind", ["docker-v2", "oci-index", "docker-manifest-list"])
def test_other_image_formats_install(tmp_path: Path, registry: RegistryServer, host: Host, kind: str) -> None:
    """Docker v2 images, and multi-platform indexes (OCI and Docker lists) pick linux/amd64."""
    if kind == "docker-v2":
        digest = push_driver(tmp_path, registry.host, K1, fmt="v2s2")
    else:
        fmt = "v2s2" if kind == "docker-manifest-list" else "oci"
        digest = push_driver(tmp_path, registry.host, K1, fmt=fmt, repo=REPO)
        # An arm64 entry (another real image) in front of the amd64 one.
        other = push_driver(tmp_path, registry.host, K2, fmt=fmt, repo=REPO)
        push_index(registry.host, REPO, tag(K1), {"linux/arm64": other, "linux/amd64": digest},
                   docker_manifest_list=kind == "docker-manifest-list")
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    marker = json.loads((host.root / tree_path(K1).lstrip("/") / ".nvidia-agent.json").read_text())
    assert marker["digest"] == digest


def corrupt_blobs(registry: RegistryServer) -> None:
    """Replace the stored bytes of every gzip layer, as a failing disk or a bad mirror would."""
    corrupted = 0
    for data in (registry.root / "data").rglob("blobs/sha256/*/*/data"):
        if data.read_bytes()[:2] == b"\x1f\x8b":
            data.write_bytes(b"\x1f\x8b" + os.urandom(data.stat().st_size - 2))
            corrupted += 1
    assert corrupted, "no layer blob found to corrupt"


FAILURES = ["tag-missing", "digest-mismatch", "other-kernel", "dotdot", "escaping-symlink"]


@pytest.mark.parametrize("failure", FAILURES)
def test_failures_leave_current_untouched_and_say_what_to_do(tmp_path: Path, registry: RegistryServer, host: Host,
                                                            failure: str) -> None:
    """Each broken or missing image for the new kernel is refused; the working driver stays current."""
    push_driver(tmp_path, registry.host, K1)
    assert host.once().returncode == 0
    before = host.current()
    if failure == "digest-mismatch":
        push_driver(tmp_path, registry.host, K2)
        corrupt_blobs(registry)
    elif failure == "other-kernel":
        push_driver(tmp_path, registry.host, K1, tag_kernel=K2)  # built for K1, tagged for K2
    elif failure == "dotdot":
        push_hostile_image(registry.host, REPO, tag(K2), kind="dotdot", kernel=K2, os_id="ubuntu",
                           os_version="22.04")
    elif failure == "escaping-symlink":
        push_hostile_image(registry.host, REPO, tag(K2), kind="escaping_symlink", kernel=K2, os_id="ubuntu",
                           os_version="22.04")
    host.set_kernel(K2)
    run = host.once()
    assert run.returncode == 2, run.stdout + run.stderr
    expected = {
        "tag-missing": "push one built for this host",
        "digest-mismatch": "digest",
        "other-kernel": f"built for kernel {K1}, this host runs {K2}",
        "dotdot": "'..' in layer path",
        "escaping-symlink": "escapes the tree",
    }[failure]
    assert expected in run.stdout, run.stdout
    assert "error   degraded" in run.stdout, run.stdout
    assert host.current() == before
    assert not (host.root / tree_path(K2).lstrip("/")).exists()
    assert host.debris() == []
    assert not (host.root.parent / "etc").exists()


def test_registry_500s_are_retried_until_it_recovers(tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    """Transient 5xx answers are retried with backoff; the install then succeeds."""
    push_driver(tmp_path, registry.host, K1)
    with FlakyProxy(registry.host, fail_first=3, fail_when=lambda m, p: manifests(m, p) or blobs(m, p)) as proxy:
        host.configure(proxy.host)
        run = host.once()
        assert run.returncode == 0, run.stdout + run.stderr
        assert sum(1 for s in proxy.seen if s.status == 500) == 3
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"


def test_bad_config_exits_78_naming_file_and_key(host: Host) -> None:
    """A configuration error is its own exit status, with file, key and the valid form."""
    write(host.root / "etc/nvidia-agent/config.d/90-bad.toml", '[image]\nattempts = "many"\n')
    run = host.once()
    assert run.returncode == 78
    assert "/etc/nvidia-agent/config.d/90-bad.toml: image.attempts" in run.stderr
    assert "an integer from 1 to 100" in run.stderr
    assert host.current() is None


def test_second_daemon_refuses_to_start(host: Host, tmp_path: Path, registry: RegistryServer) -> None:
    """One agent per host root: a second one exits 75 naming the first one's PID."""
    import fcntl  # noqa: PLC0415

    lock = host.root / "run/nvidia-agent/agent.lock"
    lock.parent.mkdir(parents=True)
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.write("4242\n")
        f.flush()
        run = host.once()
    assert run.returncode == 75
    assert "pid 4242" in run.stderr


def test_a_later_mount_over_usr_is_noticed_and_the_overlay_put_back_on_top(tmp_path: Path, registry: RegistryServer,
                                                                         host: Host) -> None:
    """An overlay mounted on /usr after the agent's (what systemd-sysext's merge does) hides the driver's
    libraries although the agent's mount stays listed: the agent notices the mount change at once (not
    at the next check_interval_s, 300 s here), mounts its overlay on top again, and stays ready."""
    push_driver(tmp_path, registry.host, K1)
    extension = write(tmp_path / "extension/usr/bin/tool", "#!/bin/sh\n").parent.parent
    usr, lib = host.root / "usr", f"libcuda.so.{DRIVER}"
    with RunningAgent(host) as agent:
        assert agent.status_json(wait_s=60)["phase"] == "ready"
        assert lib in host.in_ns("ls", str(usr / "lib64"))
        host.in_ns("mount", "-t", "overlay", "sysext", "-o", f"ro,lowerdir={extension}:{usr}", str(usr))
        hidden_at = time.monotonic()
        seen = ""
        while time.monotonic() < hidden_at + 30 and lib not in seen:
            seen = host.in_ns("ls", str(usr / "lib64"))
            time.sleep(0.2)
        shown_after = time.monotonic() - hidden_at
        assert "tool" in host.in_ns("ls", str(usr / "bin"))  # the extension stays merged beneath
        status = agent.status_json()
        code, log = agent.stop()
    assert code == 0, log
    assert lib in seen, f"the driver's libraries stayed hidden for 30 s:\n{log}"
    assert shown_after < 10, shown_after
    assert "overlay_hidden" in log, log
    assert status["phase"] == "ready", status
    assert len(host.our_mounts()) == 2  # the hidden one is left alone; the new one is on top


def test_tools_that_cannot_be_linked_are_a_warning_not_a_failure(tmp_path: Path, registry: RegistryServer,
                                                                  host: Host) -> None:
    """install.bin_dir unwritable (a merged system extension makes all of /usr read-only): the driver is
    installed, mounted and READY all the same; the log says what to set, once."""
    push_driver(tmp_path, registry.host, K1)
    write(host.root / "blocked", "a file where the directory would be\n")
    host.configure(registry.host, '[install]\nbin_dir = "/blocked/bin"\n')
    first = host.once()
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.count("tools_not_linked") == 1 and "install.bin_dir" in first.stdout, first.stdout
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
    assert len(host.our_mounts()) == 1


def test_a_hidden_overlay_is_put_back_while_serving_the_previous_tree(tmp_path: Path, registry: RegistryServer,
                                                                       host: Host) -> None:
    """Degraded but serving (the new driver has no image), with retries a minute apart: a mount over /usr
    that hides the served tree's libraries is undone at once, not at the next retry."""
    push_driver(tmp_path, registry.host, K1)
    assert host.once().returncode == 0
    host.configure(registry.host, '[driver]\nversion = "550.54.14"\n')
    write(host.root / "etc/nvidia-agent/config.d/60-slow-retry.toml",
          "[daemon]\nretry_initial_s = 60\nretry_max_s = 60\n")
    extension = write(tmp_path / "extension/usr/bin/tool", "#!/bin/sh\n").parent.parent
    usr, lib = host.root / "usr", f"libcuda.so.{DRIVER}"
    with RunningAgent(host) as agent:
        deadline = time.monotonic() + 60
        status: dict[str, object] = {}
        while time.monotonic() < deadline and not (status.get("serving") and status["phase"] == "degraded"):
            status = agent.status_json()
            time.sleep(0.2)
        assert status.get("serving") == tree_path(K1), status
        host.in_ns("mount", "-t", "overlay", "sysext", "-o", f"ro,lowerdir={extension}:{usr}", str(usr))
        hidden_at, seen = time.monotonic(), ""
        while time.monotonic() < hidden_at + 30 and lib not in seen:
            seen = host.in_ns("ls", str(usr / "lib64"))
            time.sleep(0.2)
        shown_after = time.monotonic() - hidden_at
        code, log = agent.stop()
    assert code == 0, log
    assert lib in seen and shown_after < 15, (shown_after, log)
    assert "overlay_hidden" in log, log
