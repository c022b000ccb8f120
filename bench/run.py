"""The project's performance record: P1-P4 of docs/benchmarks.md, measured against reference tools in one run.

  P1 unchanged boot   `daemon --once` on an installed, unchanged host root (whole process, wall), and process
                      start -> READY=1 of the daemon as systemd runs it; beside `python3 -c pass` started the
                      same way (umockdev-run, which shows the agent its GPUs). Warm and with caches dropped.
  P2 change path      registry -> verified, durable tree, for generated images (1 and 4 layers) and the real
                      NVIDIA 535 tree where the VM tier built it; against skopeo copy + umoci raw unpack,
                      docker pull + create + export | tar -x (a real dockerd), curl | gzip -dc | tar -x,
                      curl | pigz -dc | tar -x, and the limit: max(in-process ISA-L inflate of the layers on
                      the available cores, tar -x of the uncompressed layers + syncfs). Caches dropped each run.
  P3 memory           peak RSS (VmHWM) of the agent installing the largest image; RSS of the idle daemon.
  P4 status           `status` round trips (a client loop) against the idle daemon and during an install.

Writes bench/results.json, docs/benchmarks.md and docs/benchmarks.png (matplotlib, from the same data).
Needs root (drop_caches, dockerd) and the bench tools: bench/setup installs them.

  .ci/setup && bench/setup && .venv/bin/python bench/run.py            # ~17-20 min: 1.4 GB images, 3 runs
  .venv/bin/python bench/run.py --size-mb 200 --runs 1 --no-docs      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from common import (
    REPO,
    WRAPPER,
    Image,
    NotifySocket,
    agent_argv,
    build_and_push,
    daemon,
    drop_caches,
    generated_tree,
    host_root,
    median,
    memory_kib,
    percentile,
    scratch,
    timed,
)

from support.engine import Engine
from support.registry import RegistryServer

DRIVER, KERNEL = "535.261.03", "6.1.0-28-amd64"
# NVIDIA's 535 tree as tests/vm/build_trees.py builds it (NVIDIA_AGENT_REAL_DRIVER=1 tests/vm/run)
REAL_TREE = Path("/var/cache/nvidia-agent-vm/real-6.1.0-57-amd64")


def tag_for(driver: str, kernel: str) -> str:
    from common import OS_ID, OS_VERSION  # noqa: PLC0415

    return f"{driver}-{OS_ID}-{OS_VERSION}-{kernel}"


# ----------------------------------------------------------------------------- P1


def p1_boot(base: Path, registry: RegistryServer, runs: int) -> dict[str, Any]:
    """An installed, unchanged host: the registry is stopped before the boots are timed (no network)."""
    tree, _ = generated_tree(base / "tree", size_mb=0, driver=DRIVER, kernel=KERNEL)
    build_and_push(tree, registry=registry.host, name="boot/driver", tag=tag_for(DRIVER, KERNEL), driver=DRIVER,
                   kernel=KERNEL, layers=1, work=base / "build")
    root = host_root(base / "root", registry=registry.host, kernel=KERNEL, driver=DRIVER, repository="boot/driver")
    subprocess.run(agent_argv(root, "daemon", "--once"), check=True, cwd=REPO, capture_output=True)
    registry.stop()
    result: dict[str, Any] = {}
    for cold in (False, True):
        once, ref, ready, ref_ready = [], [], [], []
        for _ in range(runs):
            once.append(timed(agent_argv(root, "daemon", "--once"), cold=cold))
            ref.append(timed([*WRAPPER, sys.executable, "-c", "pass"], cold=cold))
            ready.append(_start_to_ready(root, base, cold=cold))
            ref_ready.append(timed([*WRAPPER, sys.executable, "-c", "pass"], cold=cold))
        result["cold" if cold else "warm"] = {
            "once_s": median(once), "once_runs": once, "start_to_ready_s": median(ready), "ready_runs": ready,
            "python_pass_s": median(ref + ref_ready)}
    result["imports"] = _import_profile(root)
    result["idle_rss_mib"] = _idle_rss(root, base)
    return result


def _idle_rss(root: Path, base: Path) -> float:
    """RSS of the daemon a second after READY on the unchanged host (MiB)."""
    notify = NotifySocket(base)
    try:
        with daemon(root, notify) as (_proc, _started, pid):
            notify.wait_ready(30)
            time.sleep(1.0)
            return memory_kib(pid)["VmRSS"] / 1024
    finally:
        notify.close()


def _start_to_ready(root: Path, base: Path, *, cold: bool) -> float:
    if cold:
        drop_caches()
    notify = NotifySocket(base)
    try:
        with daemon(root, notify) as (_proc, started, _pid):
            return notify.wait_ready(30) - started
    finally:
        notify.close()


def _import_profile(root: Path) -> list[tuple[str, float]]:
    """The largest imports of an unchanged boot (python -X importtime, cumulative ms, top level)."""
    run = subprocess.run([*WRAPPER, sys.executable, "-X", "importtime", "-m", "agent", "--root", str(root),
                          "daemon", "--once"], cwd=REPO, capture_output=True, text=True, check=True)
    rows = []
    for line in run.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = line.split("|")
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # 0: imported by the program itself
        if depth <= 2 and cumulative.strip().isdigit():
            rows.append((name.strip(), int(cumulative) / 1000))
    return sorted(rows, key=lambda r: -r[1])[:12]


# ----------------------------------------------------------------------------- P2, P3, P4


def p2_install(base: Path, image: Image, registry: RegistryServer, engine: Engine, runs: int) -> dict[str, Any]:
    """One image: the agent and every reference, `runs` times each, caches dropped before each."""
    times: dict[str, list[float]] = {k: [] for k in (
        "agent", "skopeo+umoci", "docker pull+export", "curl|gzip|tar", "curl|pigz|tar", "inflate", "tar+syncfs")}
    uncompressed = _uncompressed_layers(base / "plain", image)
    repo = image.ref.split("/", 1)[1].rsplit(":", 1)[0]
    urls = [f"{registry.url}/v2/{repo}/blobs/{d['digest']}" for d in image.layers]
    for run in range(runs):
        root = host_root(base / f"root{run}", registry=registry.host, kernel=image.kernel, driver=image.driver,
                         repository=repo)
        times["agent"].append(timed(agent_argv(root, "daemon", "--once")))
        _check_installed(root, image)
        out = base / f"out{run}"
        out.mkdir(parents=True)
        times["skopeo+umoci"].append(timed(
            f"skopeo copy -q --src-tls-verify=false docker://{image.ref} oci:{out}/oci:x && "
            f"umoci raw unpack --image {out}/oci:x {out}/umoci"))
        times["docker pull+export"].append(_docker(engine, image.ref, out / "docker"))
        for tool in ("gzip", "pigz"):
            dest = out / tool
            dest.mkdir(parents=True)
            pipes = " && ".join(f"curl -sf {u} | {tool} -dc | tar -x -C {dest}" for u in urls)
            times[f"curl|{tool}|tar"].append(timed(pipes))
        times["inflate"].append(timed([sys.executable, str(Path(__file__).parent / "inflate.py"),
                                       *(str(image.blob(d)) for d in image.layers)]))
        dest = out / "tar"
        dest.mkdir(parents=True)
        times["tar+syncfs"].append(timed(" && ".join(f"tar -x -C {dest} -f {p}" for p in uncompressed)
                                         + f" && sync -f {dest}"))
        for p in (root, out):
            shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(base / "plain", ignore_errors=True)
    med = {k: median(v) for k, v in times.items()}
    med["limit"] = max(med["inflate"], med["tar+syncfs"])
    return {"image": image.name, "tree_bytes": image.tree_bytes, "layer_bytes": image.layer_bytes,
            "layers": len(image.layers), "median_s": med, "runs_s": times}


def _uncompressed_layers(where: Path, image: Image) -> list[Path]:
    where.mkdir(parents=True, exist_ok=True)
    out = []
    for i, desc in enumerate(image.layers):
        plain = where / f"layer{i}.tar"
        with plain.open("wb") as f:
            subprocess.run(["gzip", "-dc", str(image.blob(desc))], stdout=f, check=True)
        out.append(plain)
    return out


def _docker(engine: Engine, ref: str, dest: Path) -> float:
    """docker pull, create, export | tar -x: the way a driver container's files reach a host."""
    sock = f"unix://{engine.socket}"
    dest.mkdir(parents=True)
    drop_caches()
    start = time.perf_counter()
    subprocess.run(["docker", "-H", sock, "pull", "-q", ref], check=True, capture_output=True)
    cid = subprocess.run(["docker", "-H", sock, "create", ref, "/none"], check=True, capture_output=True,
                         text=True).stdout.strip()
    subprocess.run(f"docker -H {sock} export {cid} | tar -x -C {dest}", shell=True, check=True)  # noqa: S602
    elapsed = time.perf_counter() - start
    subprocess.run(["docker", "-H", sock, "rm", cid], check=True, capture_output=True)
    subprocess.run(["docker", "-H", sock, "rmi", ref], check=True, capture_output=True)
    return elapsed


def _check_installed(root: Path, image: Image) -> None:
    current = root / "opt/nvidia/current"
    if not (current.is_symlink() and (current / "manifest.json").is_file()):
        raise RuntimeError(f"the agent did not install {image.ref} under {root}")


def p3_p4_during_install(base: Path, image: Image, registry: RegistryServer) -> dict[str, Any]:
    """The daemon installing `image` while a client asks `status` in a loop; its peak RSS; then idle."""
    from agent.status import query  # noqa: PLC0415

    repo = image.ref.split("/", 1)[1].rsplit(":", 1)[0]
    root = host_root(base / "root-live", registry=registry.host, kernel=image.kernel, driver=image.driver,
                     repository=repo)
    sock = root / "run/nvidia-agent/status.sock"
    notify = NotifySocket(base)
    busy: list[float] = []
    idle: list[float] = []
    drop_caches()
    try:
        with daemon(root, notify) as (_proc, _started, pid):
            done = threading.Event()
            waiter = threading.Thread(target=lambda: (notify.wait_ready(1800), done.set()), daemon=True)
            waiter.start()
            while not sock.exists():
                time.sleep(0.005)
            while not done.is_set():
                busy.append(_round_trip(query, sock))
            peak = memory_kib(pid)["VmHWM"]
            time.sleep(1.0)  # settled: the pass has ended
            for _ in range(1000):
                idle.append(_round_trip(query, sock))
            idle_rss = memory_kib(pid)["VmRSS"]
    finally:
        notify.close()
    _check_installed(root, image)
    shutil.rmtree(root, ignore_errors=True)
    return {"image": image.name, "install_peak_rss_mib": peak / 1024, "idle_rss_mib": idle_rss / 1024,
            "status_busy_ms": {"p50": percentile(busy, 0.5) * 1e3, "p99": percentile(busy, 0.99) * 1e3,
                               "n": len(busy)},
            "status_idle_ms": {"p50": percentile(idle, 0.5) * 1e3, "p99": percentile(idle, 0.99) * 1e3,
                               "n": len(idle)}}


def _round_trip(query: Any, sock: Path) -> float:
    start = time.perf_counter()
    query(sock, timeout_s=5.0)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- the run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=1400, help="the generated tree's size (default 1400)")
    ap.add_argument("--runs", type=int, default=3, help="runs per measurement; medians are reported (default 3)")
    ap.add_argument("--boot-runs", type=int, default=15, help="runs per P1 measurement (default 15)")
    ap.add_argument("--no-docs", action="store_true", help="print the results; leave results.json and docs/ alone")
    ap.add_argument("--only", choices=("p1", "p2"), help="P1 alone, or P2-P4 alone; merged into bench/results.json")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/run.py: run as root (drop_caches, dockerd)")
    for tool in ("skopeo", "umoci", "dockerd", "docker", "curl", "pigz", "umockdev-run"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench/run.py: {tool} is missing: run bench/setup")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "agent")], check=True)  # as installed
    kept = REPO / "bench/results.json"
    results: dict[str, Any] = json.loads(kept.read_text()) if args.only and kept.is_file() else {}
    results |= {"machine": _machine(), "caches_dropped": drop_caches(), "at": time.time(), "runs": args.runs}
    base = scratch("nvidia-agent-bench-")
    (base / "engine").mkdir()
    engine = Engine(base / "engine").start()
    try:
        if args.only in (None, "p1"):
            with RegistryServer(base / "boot-registry") as boot_registry:
                results["p1"] = p1_boot(base / "p1", boot_registry, args.boot_runs)
            _say("P1", results["p1"])
        if args.only in (None, "p2"):
            _p2_to_p4(base, engine, args, results)
    finally:
        engine.stop()
        subprocess.run(["umount", "--recursive", "--lazy", str(base / "engine" / "root")], check=False,
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)
    if not args.no_docs:  # a quick look leaves the numbers of record alone
        from report import write_docs  # noqa: PLC0415

        kept.write_text(json.dumps(results, indent=1) + "\n")
        write_docs(results, REPO / "docs")
    return 0


def _p2_to_p4(base: Path, engine: Engine, args: argparse.Namespace, results: dict[str, Any]) -> None:
    with RegistryServer(base / "registry") as registry:
        images = _images(base, registry, args.size_mb)
        results["p2"] = []
        for image in images:
            results["p2"].append(p2_install(base / "p2", image, registry, engine, args.runs))
            _say("P2", results["p2"][-1])
        results["p3p4"] = p3_p4_during_install(base / "p3", images[0], registry)
        _say("P3/P4", results["p3p4"])


def _images(base: Path, registry: RegistryServer, size_mb: int) -> list[Image]:
    images = []
    tree, _ = generated_tree(base / "gen-tree", size_mb=size_mb, driver=DRIVER, kernel=KERNEL)
    for layers in (1, 4):
        images.append(build_and_push(tree, registry=registry.host, name=f"gen{layers}/driver",
                                     tag=tag_for(DRIVER, KERNEL), driver=DRIVER, kernel=KERNEL, layers=layers,
                                     work=base / f"build{layers}"))
    shutil.rmtree(base / "gen-tree")
    real = REAL_TREE / "tree"
    if real.is_dir():
        key = json.loads((REAL_TREE / "key.json").read_text())
        image = build_and_push(real, registry=registry.host, name="real/driver",
                               tag=tag_for(key["driver"], key["kernel"]), driver=key["driver"],
                               kernel=key["kernel"], layers=1, work=base / "build-real")
        images.append(Image(f"NVIDIA {key['driver']} ({image.tree_bytes / 1e6:.0f} MB tree), 1 layer", image.ref,
                            image.driver, image.kernel, image.tree_bytes, image.layers, image.layout))
    else:
        print(f"(no real NVIDIA tree at {REAL_TREE}: NVIDIA_AGENT_REAL_DRIVER=1 tests/vm/run builds it)")
    return images


def _machine() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)}


def _say(what: str, data: Any) -> None:
    print(f"{what}: {json.dumps(data, default=str)[:2000]}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
