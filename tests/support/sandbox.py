"""A sandboxed host for end-to-end tests: a host root in a temp dir with its own mount namespace,
GPUs presented by umockdev, the agent run as a real process against it, and driver images
pushed to a real registry by packaging/build-driver-image (umoci + skopeo).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from support.images import build_image, make_driver_tree
from support.registry import RegistryServer

REPO_ROOT = Path(__file__).resolve().parents[2]
FIXTURES = REPO_ROOT / "tests" / "fixtures"


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path
DRIVER = "535.261.03"
REPO = "nvidia/driver"
K1, K2 = "6.1.0-28-amd64", "6.1.0-29-amd64"
UBUNTU = (FIXTURES / "os-release/ubuntu-22.04").read_text()
AGENT_TIMEOUT_S = 120
NEEDED = ("unshare", "nsenter", "umockdev-run", "docker-registry", "skopeo", "umoci", "gcc", "ldconfig")


def tag(kernel: str) -> str:
    return f"{DRIVER}-ubuntu-22.04-{kernel}"


def tree_path(kernel: str) -> str:
    return f"/opt/nvidia/{DRIVER}/ubuntu-22.04-{kernel}"


class Host:
    """A host root in a temp dir with a persistent private mount namespace to run the agent in."""

    def __init__(self, base: Path, registry: str) -> None:
        self.base = base
        self.root = base / "root"
        self.ns_dir = base / "ns"
        self.command = [sys.executable, "-m", "agent"]  # or a frozen build (tests/test_sysext.py)
        write(self.root / "etc/os-release", UBUNTU)
        write(self.root / "etc/ld.so.conf", "/usr/lib64\n")  # a lib64 host's linker searches /usr/lib64
        write(self.root / "usr/lib64/libhost.so.1", b"host library")
        (self.root / "sys/module").mkdir(parents=True)
        self.set_kernel(K1)
        self.configure(registry)
        self.ns_dir.mkdir()
        for argv in (["mount", "--bind", str(self.ns_dir), str(self.ns_dir)],
                     ["mount", "--make-private", str(self.ns_dir)]):
            subprocess.run(argv, check=True)
        (self.ns_dir / "mnt").touch()
        subprocess.run(["unshare", f"--mount={self.ns_dir / 'mnt'}", "--propagation", "private", "true"], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.ns_dir / "mnt")], check=False)
        subprocess.run(["umount", "--lazy", str(self.ns_dir)], check=False)

    def set_kernel(self, kernel: str) -> None:
        write(self.root / "proc/sys/kernel/osrelease", kernel + "\n")

    def configure(self, registry: str, extra: str = "", *, image: str = "", plain_http: bool = True) -> None:
        """The test's config fragment: the registry (plain http unless told otherwise), no module loading,
        quick retries; `image` adds keys to [image], `extra` whole sections."""
        listed = f'plain_http = ["{registry}"]\n' if plain_http else ""
        write(self.root / "etc/nvidia-agent/config.d/50-test.toml",
              f'[image]\nregistry = "{registry}"\n{listed}{image}'
              '[modules]\nload = false  # this machine\'s kernel cannot load modules (proven in the VM tier)\n'
              '[daemon]\nretry_initial_s = 0.5\nretry_max_s = 2\n' + extra)

    def argv(self, *args: str) -> list[str]:
        return ["nsenter", f"--mount={self.ns_dir / 'mnt'}", "--", "umockdev-run", "-d",
                str(FIXTURES / "udev/gpus.umockdev"), "--", *self.command, "--root", str(self.root), *args]

    def agent(self, *args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        run_env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"} | dict(env or {})
        return subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=AGENT_TIMEOUT_S,
                              env=run_env, cwd=REPO_ROOT, check=False)

    def once(self, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return self.agent("daemon", "--once", env=env)

    def in_ns(self, *argv: str) -> str:
        return subprocess.run(["nsenter", f"--mount={self.ns_dir / 'mnt'}", "--", *argv], capture_output=True,
                              text=True, check=True, timeout=30).stdout

    def current(self) -> str | None:
        link = self.root / "opt/nvidia/current"
        return os.readlink(link) if link.is_symlink() else None

    def our_mounts(self) -> list[str]:
        lines = self.in_ns("cat", "/proc/self/mountinfo").splitlines()
        return [line for line in lines if f" {self.root}/usr/lib64 " in line and " nvidia-agent " in line]

    def debris(self) -> list[str]:
        base = self.root / "opt/nvidia"
        return [p.name for p in base.iterdir() if p.name.startswith((".staging-", ".trash-"))] if base.exists() else []


def push_driver(tmp_path: Path, registry: str, kernel: str, *, tag_kernel: str | None = None,
                fmt: str = "oci", repo: str = REPO, big_lib_bytes: int = 0, compressible: bool = False) -> str:
    """Build and push a driver image for `kernel`; `big_lib_bytes` adds an incompressible library
    of that size (a layer of several download chunks), or with `compressible` one of zeros (a
    small layer that unpacks big)."""
    tree = make_driver_tree(tmp_path / f"tree-{kernel}-{tag_kernel}-{fmt}-{big_lib_bytes}", driver=DRIVER,
                            kernel=kernel)
    if big_lib_bytes:
        write(tree / f"lib64/libnvidia-big.so.{DRIVER}",
              bytes(big_lib_bytes) if compressible else os.urandom(big_lib_bytes))
    return build_image(tree, f"{registry}/{repo}:{tag(tag_kernel or kernel)}", driver=DRIVER, os_id="ubuntu",
                       os_version="22.04", kernel=kernel, fmt=fmt)


class RunningAgent:
    """`nvidia-agent daemon` running on a Host, asked over its socket, stopped with SIGTERM."""

    def __init__(self, host: Host, env: Mapping[str, str] | None = None) -> None:
        self.host = host
        run_env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"} | dict(env or {})
        self.proc = subprocess.Popen(host.argv("daemon"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=run_env, cwd=REPO_ROOT, start_new_session=True)

    def status(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agent", "--root", str(self.host.root), "status", *args],
                              capture_output=True, text=True, timeout=120, check=False, cwd=REPO_ROOT)

    def status_json(self, wait_s: float = 0) -> dict[str, object]:
        out = self.status("--json", "--wait", str(wait_s))
        return dict(json.loads(out.stdout)) if out.stdout else {}

    def stop(self) -> tuple[int, str]:
        """SIGTERM the agent (by its lock's PID: it may sit outside umockdev-run's group); exit status and log."""
        lock = self.host.root / "run/nvidia-agent/agent.lock"
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(lock.read_text()), signal.SIGTERM)
        log, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, log

    def __enter__(self) -> RunningAgent:
        return self

    def __exit__(self, *_: object) -> None:
        if self.proc.poll() is None:
            lock = self.host.root / "run/nvidia-agent/agent.lock"
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(lock.read_text()), signal.SIGKILL)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.communicate(timeout=30)


def status_json(host: Host) -> dict[str, object]:
    """Run the daemon until ready, ask `status --json` and `status` over the socket, stop it with SIGTERM."""
    with RunningAgent(host) as agent:
        out = agent.status("--json", "--wait", "60")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "phase:       ready" in agent.status().stdout
        code, log = agent.stop()
        assert (code, "stopped phase=ready" in log) == (0, True), log
        return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [t for t in NEEDED if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see .ci/run for the packages)")


@pytest.fixture
def registry(tmp_path: Path, tools: None) -> Iterator[RegistryServer]:
    """A registry of the test's own (modules that want the session one override this name)."""
    with RegistryServer(tmp_path / "registry") as server:
        yield server


@pytest.fixture
def host(tmp_path: Path, registry: RegistryServer) -> Iterator[Host]:
    h = Host(tmp_path, registry.host)
    yield h
    h.close()

