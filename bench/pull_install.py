"""Benchmark: pull + verify + install of a driver image, against reference tools in the same run.

Builds a driver tree of --size-mb from real shared libraries on this machine (so it compresses like
a driver does), pushes it as one gzip layer to a local registry, then times, median of --runs:
  agent      nvidia-agent daemon --once (resolve, stream + sha256 every blob, extract with checks,
             verify every file's digest and each module's vermagic, rename into place)
  skopeo     skopeo copy docker://... oci:DIR + umoci raw unpack (no verification of the tree)
  curl       curl blob | gzip -dc | tar -x (no verification at all)
and reports wall seconds, the ratio to the references, and the agent's peak RSS.
Run as root on the build machine:  .venv/bin/python bench/pull_install.py --size-mb 300
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from support.images import build_image, make_driver_tree  # noqa: E402
from support.registry import RegistryServer  # noqa: E402

DRIVER, KERNEL = "535.261.03", "6.1.0-28-amd64"


def fill_libs(lib64: Path, size_mb: int) -> int:
    """Copy real .so files (cycling) into lib64 until size_mb is reached."""
    sources = sorted(p for p in Path("/usr/lib/x86_64-linux-gnu").glob("*.so*") if p.is_file() and not p.is_symlink())
    total, i = 0, 0
    while total < size_mb << 20:
        src = sources[i % len(sources)]
        dst = lib64 / f"libbench{i}.so.{DRIVER}"
        shutil.copyfile(src, dst)
        total += dst.stat().st_size
        i += 1
    return total


def drop_caches() -> None:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        pass


def timed(argv: list[str], **kw: object) -> float:
    drop_caches()
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, **kw)  # type: ignore[call-overload]
    return time.perf_counter() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mb", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="nvidia-agent-bench-") as tmp:
        base = Path(tmp)
        with RegistryServer(base / "registry") as reg:
            tree = make_driver_tree(base / "tree", driver=DRIVER, kernel=KERNEL)
            tree_bytes = fill_libs(tree / "lib64", args.size_mb)
            ref = f"{reg.host}/nvidia/driver:{DRIVER}-flatcar-3815.2.0-{KERNEL}"
            build_image(tree, ref, driver=DRIVER, os_id="flatcar", os_version="3815.2.0", kernel=KERNEL)
            manifest = json.loads(subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                                  f"docker://{ref}"], capture_output=True, check=True).stdout)
            layer = manifest["layers"][0]
            blob_url = f"{reg.url}/v2/nvidia/driver/blobs/{layer['digest']}"
            results: dict[str, list[float]] = {"agent": [], "skopeo+umoci": [], "curl|gzip|tar": []}
            rss_kib: list[int] = []
            for run in range(args.runs):
                root = base / f"root{run}"
                for path, text in {"etc/os-release": "ID=flatcar\nVERSION_ID=3815.2.0\n",
                                   "proc/sys/kernel/osrelease": KERNEL + "\n",
                                   "etc/nvidia-agent/config.d/50-bench.toml":
                                       f'[image]\nregistry = "{reg.host}"\nplain_http = ["{reg.host}"]\n'
                                       "[mount]\nenabled = false\n[modules]\nload = false\n"}.items():
                    (root / path).parent.mkdir(parents=True, exist_ok=True)
                    (root / path).write_text(text)
                agent = ["umockdev-run", "-d", str(REPO / "tests/fixtures/udev/gpus.umockdev"), "--",
                         sys.executable, "-m", "agent", "--root", str(root), "daemon", "--once"]
                rss_file = base / "rss"
                # A wrapper process whose only children are the agent (and umockdev-run), so its
                # RUSAGE_CHILDREN peak is the agent's own.
                wrapper = (f"import resource, subprocess; subprocess.run({agent!r}, check=True, "
                           f"stdout=subprocess.DEVNULL, cwd={str(REPO)!r}); "
                           f"rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
                           f"open({str(rss_file)!r}, 'w').write(str(rss))")
                results["agent"].append(timed([sys.executable, "-c", wrapper]))
                rss_kib.append(int(rss_file.read_text()))
                oci = base / f"oci{run}"
                results["skopeo+umoci"].append(timed(["sh", "-c",
                    f"skopeo copy -q --src-tls-verify=false docker://{ref} oci:{oci}:x && "
                    f"umoci raw unpack --image {oci}:x {base}/umoci{run}"]))
                out = base / f"curl{run}"
                out.mkdir()
                results["curl|gzip|tar"].append(timed(["sh", "-c",
                    f"curl -sf {blob_url} | gzip -dc | tar -x -C {out}"]))
                for p in (root, oci, base / f"umoci{run}", out):
                    shutil.rmtree(p, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"tree {tree_bytes / 2**20:.0f} MiB, layer {layer['size'] / 2**20:.0f} MiB gzip, "
          f"median of {args.runs} runs (wall s), caches dropped: {os.access('/proc/sys/vm/drop_caches', os.W_OK)}")
    for name, value in med.items():
        print(f"  {name:<15} {value:6.2f} s   runs {', '.join(f'{x:.2f}' for x in results[name])}")
    print(f"  agent / skopeo+umoci = {med['agent'] / med['skopeo+umoci']:.2f}   "
          f"agent / curl|gzip|tar = {med['agent'] / med['curl|gzip|tar']:.2f}")
    print(f"  peak RSS of the agent process (max over runs): {max(rss_kib) / 1024:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
