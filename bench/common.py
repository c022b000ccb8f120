"""What the benchmarks share: driver images of any size and layer count, sandbox host roots, timing.

Every number is taken on this machine in the same run as its references, page cache dropped
before each timed command (where the kernel lets us), and reported as a median.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from support.images import make_driver_tree  # noqa: E402

UDEV_FIXTURE = REPO / "tests/fixtures/udev/gpus.umockdev"
WRAPPER = ["umockdev-run", "-d", str(UDEV_FIXTURE), "--"]  # the GPUs the agent sees, for agent and reference alike
OS_ID, OS_VERSION = "flatcar", "3815.2.0"


def build_script() -> ModuleType:
    """packaging/build-driver-image as a module (its manifest writer; the bench's layer split is its own)."""
    loader = importlib.machinery.SourceFileLoader("build_driver_image", str(REPO / "packaging/build-driver-image"))
    spec = importlib.util.spec_from_loader("build_driver_image", loader)
    assert spec is not None  # noqa: S101
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def drop_caches() -> bool:
    """Write back and drop the page cache; False where the kernel does not let us (then runs are warm)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fill_libs(lib64: Path, size_mb: int, driver: str) -> int:
    """Copy real shared libraries of this machine (cycling) into lib64 until size_mb: a tree that
    compresses like a driver's. Returns the bytes written."""
    sources = sorted(p for p in Path("/usr/lib/x86_64-linux-gnu").glob("*.so*")
                     if p.is_file() and not p.is_symlink() and p.stat().st_size > 4096)
    total, i = 0, 0
    while total < size_mb << 20:
        src = sources[i % len(sources)]
        dst = lib64 / f"libnvidia-bench{i}.so.{driver}"  # an allowed name (install.lib64_allow)
        shutil.copyfile(src, dst)
        total += dst.stat().st_size
        i += 1
    return total


@dataclass(frozen=True)
class Image:
    """A driver image pushed to the bench's registry."""

    name: str  # for tables: "1.4 GB, 1 layer"
    ref: str  # HOST/REPO:TAG
    driver: str
    kernel: str
    tree_bytes: int
    layers: tuple[dict[str, Any], ...]  # the manifest's layer descriptors
    layout: Path  # the OCI layout it was pushed from (its blobs are the layers)

    @property
    def layer_bytes(self) -> int:
        return sum(int(d["size"]) for d in self.layers)

    def blob(self, desc: dict[str, Any]) -> Path:
        return self.layout / "blobs" / "sha256" / str(desc["digest"]).removeprefix("sha256:")


def generated_tree(base: Path, *, size_mb: int, driver: str, kernel: str) -> tuple[Path, int]:
    """The tests' driver tree (real test modules for `kernel`) plus size_mb of real libraries."""
    tree = make_driver_tree(base, driver=driver, kernel=kernel)
    return tree, fill_libs(tree / "lib64", size_mb, driver)


def build_and_push(tree: Path, *, registry: str, name: str, tag: str, driver: str, kernel: str, layers: int,
                   work: Path) -> Image:
    """The image the contract describes (docs/driver-image.md), its files split over `layers` gzip layers
    (the first holds manifest.json, the modules and everything small; the libraries are dealt out by size),
    built with umoci and pushed with skopeo as packaging/build-driver-image does."""
    bdi = build_script()
    staged_root = work / "root"
    staged = staged_root / "nvidia-driver"
    shutil.copytree(tree, staged, symlinks=True)
    args = _BuildArgs(driver, OS_ID, OS_VERSION, kernel)
    bdi.write_manifest(staged, bdi.make_manifest(staged, args))
    members = sorted(p.relative_to(staged_root).as_posix() for p in staged.rglob("*"))
    big = sorted((m for m in members if (staged_root / m).is_file() and not (staged_root / m).is_symlink()
                  and (staged_root / m).stat().st_size > 1 << 20), key=lambda m: -(staged_root / m).stat().st_size)
    groups: list[list[str]] = [[] for _ in range(layers)]
    sizes = [0] * layers
    for m in big:  # largest first onto the lightest of layers 1..n-1 (layer 0 when there is one layer)
        i = min(range(1 if layers > 1 else 0, layers), key=lambda k: sizes[k])
        groups[i].append(m)
        sizes[i] += (staged_root / m).stat().st_size
    placed = set(big)
    groups[0] = ["nvidia-driver"] + [m for m in members if m not in placed] + groups[0]
    layout = work / "layout"
    image = f"{layout}:x"
    _run(["umoci", "init", "--layout", str(layout)])
    _run(["umoci", "new", "--image", image])
    for i, group in enumerate(groups):
        listing = work / f"layer{i}.list"
        listing.write_text("\n".join(group) + "\n")
        tar = work / f"layer{i}.tar"
        _run(["tar", "--create", "--file", str(tar), "--directory", str(staged_root), "--format=gnu",
              "--no-recursion", "--owner=0", "--group=0", "--numeric-owner", "-T", str(listing)])
        _run(["umoci", "raw", "add-layer", "--image", image, str(tar)])
        tar.unlink()
    _run(["umoci", "config", "--image", image, "--no-history", "--os", "linux", "--architecture", "amd64",
          "--config.label", f"io.nvidia-agent.driver-version={driver}"])
    _run(["umoci", "gc", "--layout", str(layout)])
    ref = f"{registry}/{name}:{tag}"
    _run(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{image}", f"docker://{ref}"])
    index = json.loads((layout / "index.json").read_text())
    manifest_digest = index["manifests"][0]["digest"].removeprefix("sha256:")
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest).read_text())
    shutil.rmtree(staged_root)
    tree_bytes = sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())
    gib = tree_bytes / 1e9
    return Image(f"{gib:.2f} GB tree, {layers} layer{'s' if layers > 1 else ''}", ref, driver, kernel, tree_bytes,
                 tuple(manifest["layers"]), layout)


@dataclass(frozen=True)
class _BuildArgs:
    driver_version: str
    os_id: str
    os_version: str
    kernel_release: str


def _run(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed: {result.stderr.strip()[-2000:]}")


def host_root(path: Path, *, registry: str, kernel: str, driver: str, repository: str = "nvidia/driver",
              extra: str = "") -> Path:
    """A sandbox host root for `--root`: os-release, the running kernel, the agent's config (mount and
    module loading off: this machine's kernel loads nothing; the guest proves those)."""
    files = {
        "etc/os-release": f"ID={OS_ID}\nVERSION_ID={OS_VERSION}\n",
        "proc/sys/kernel/osrelease": kernel + "\n",
        "etc/nvidia-agent/config.d/50-bench.toml":
            f'[driver]\nversion = "{driver}"\n'
            f'[image]\nregistry = "{registry}"\nrepository = "{repository}"\nplain_http = ["{registry}"]\n'
            "[mount]\nenabled = false\n[modules]\nload = false\n" + extra,
    }
    for rel, text in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_text(text)
    return path


def agent_argv(root: Path, *args: str) -> list[str]:
    return [*WRAPPER, sys.executable, "-m", "agent", "--root", str(root), *args]


def timed(argv: list[str] | str, *, cold: bool = True, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one command (a shell line when a string), caches dropped first when `cold`."""
    if cold:
        drop_caches()
    start = time.perf_counter()
    run = subprocess.run(argv, check=False, shell=isinstance(argv, str), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, cwd=REPO, env=env)
    elapsed = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"{argv} failed ({run.returncode}): {run.stderr.decode(errors='replace')[-2000:]}")
    return elapsed


def child_pid(parent: int, name: str = "python", timeout_s: float = 10.0) -> int:
    """The PID of `parent`'s child process running `name` (umockdev-run's child: the agent itself)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
                if int(fields[1]) == parent and name in comm:
                    return int(stat.parent.name)
        time.sleep(0.01)
    raise RuntimeError(f"no {name} child of {parent}")


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (the peak) of a live process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


class NotifySocket:
    """systemd's notify socket, for the bench: when READY=1 arrived."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))

    def wait_ready(self, timeout_s: float) -> float:
        """perf_counter() when READY=1 came."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            if b"READY=1" in data.split(b"\n"):
                return time.perf_counter()
        raise RuntimeError("no READY=1")

    def close(self) -> None:
        self.sock.close()
        self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def daemon(root: Path, notify: NotifySocket) -> Iterator[tuple[subprocess.Popen[bytes], float, int]]:
    """The agent as systemd runs it (Type=notify) on `root`: (process, perf_counter at spawn, the agent's PID)."""
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path))
    started = time.perf_counter()
    proc = subprocess.Popen(agent_argv(root, "daemon"), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        yield proc, started, child_pid(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def scratch(prefix: str) -> Path:
    """A directory on the same filesystem as the agent's default roots (the disk the installs land on)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
