"""A real docker engine for tests: its own data and exec roots and socket in a temp dir, no bridge,
no iptables (it must never touch this machine's networking), stopped by PID."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

READY_TIMEOUT_S = 30


class Engine:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.socket = base / "d.sock"  # short: a unix socket path has 107 bytes at most
        self.client: docker.DockerClient | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Engine:
        log = (self.base / "dockerd.log").open("wb")
        with log:
            self._proc = subprocess.Popen(
                ["dockerd", "--data-root", str(self.base / "root"), "--exec-root", str(self.base / "exec"),
                 "--pidfile", str(self.base / "dockerd.pid"), "-H", f"unix://{self.socket}",
                 "--storage-driver", "overlay2", "--iptables=false", "--ip6tables=false", "--bridge=none",
                 "--ip-forward=false", "--ip-masq=false"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                self.client = docker.DockerClient(base_url=f"unix://{self.socket}", timeout=60)
                self.client.ping()
                return self
            except docker.errors.DockerException:
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"dockerd did not start:\n{self.log()}") from None
                time.sleep(0.2)

    def log(self) -> str:
        return (self.base / "dockerd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    if shutil.which("dockerd") is None:
        pytest.skip("needs dockerd (apt: docker.io)")
    base = Path(tempfile.mkdtemp(prefix="de-", dir="/tmp"))
    running = Engine(base).start()
    try:
        yield running
    finally:
        running.stop()
        subprocess.run(["umount", "--recursive", "--lazy", str(base / "root")], check=False, capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
