"""Run the agent's main job on an embedded default: a local registry, a sample driver image, a sandboxed host root.

What happens (all on 127.0.0.1 and under a temp dir; the real /usr/lib64 is never touched):
  1. Debian's docker-registry starts on a free loopback port.
  2. A sample driver tree (modules with real .modinfo for the sandbox's kernel, libraries, nvidia-smi)
     is built into an OCI image by packaging/build-driver-image (umoci + skopeo) and pushed.
  3. A host root is laid out (Flatcar os-release, a kernel release) with a private mount namespace.
  4. `nvidia-agent daemon` runs in that namespace with two NVIDIA GPUs presented by umockdev,
     installs the image to <root>/opt/nvidia/<driver>/<os>, overlays its lib64 onto <root>/usr/lib64.
  5. `nvidia-agent status` is asked over the socket; the overlay is listed; the daemon is stopped.
Module loading is off here: this machine's kernel cannot load modules.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from support.images import build_image, make_driver_tree  # noqa: E402
from support.registry import RegistryServer  # noqa: E402

DRIVER = "535.261.03"
KERNEL = "6.1.0-28-amd64"
OS_RELEASE = 'NAME="Flatcar Container Linux by Kinvolk"\nID=flatcar\nVERSION_ID=3815.2.0\n' \
             'PRETTY_NAME="Flatcar Container Linux by Kinvolk 3815.2.0 (Oklo)"\n'


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="nvidia-agent-demo-") as tmp:
        base = Path(tmp)
        root = base / "root"
        with RegistryServer(base / "registry") as registry:
            print(f"== registry on {registry.host}")
            tree = make_driver_tree(base / "tree", driver=DRIVER, kernel=KERNEL)
            ref = f"{registry.host}/nvidia/driver:{DRIVER}-flatcar-3815.2.0-{KERNEL}"  # {driver}-{os}
            digest = build_image(tree, ref, driver=DRIVER, os_id="flatcar", os_version="3815.2.0", kernel=KERNEL)
            print(f"== pushed {ref}@{digest} (built with umoci + skopeo)")
            for path, text in {
                "etc/os-release": OS_RELEASE,
                "proc/sys/kernel/osrelease": KERNEL + "\n",
                "etc/ld.so.conf": "/usr/lib64\n",
                "etc/nvidia-agent/config.d/50-demo.toml": (
                    f'[image]\nregistry = "{registry.host}"\nplain_http = ["{registry.host}"]\n'
                    "[modules]\nload = false\n"),
            }.items():
                (root / path).parent.mkdir(parents=True, exist_ok=True)
                (root / path).write_text(text)
            (root / "usr/lib64").mkdir(parents=True)
            (root / "sys/module").mkdir(parents=True)
            ns = base / "ns"
            ns.mkdir()
            subprocess.run(["mount", "--bind", ns, ns], check=True)
            subprocess.run(["mount", "--make-private", ns], check=True)
            (ns / "mnt").touch()
            try:
                subprocess.run(["unshare", f"--mount={ns / 'mnt'}", "--propagation", "private", "true"], check=True)
                enter = ["nsenter", f"--mount={ns / 'mnt'}", "--"]
                agent = [sys.executable, "-m", "agent", "--root", str(root)]
                gpus = ["umockdev-run", "-d", str(REPO / "tests/fixtures/udev/gpus.umockdev"), "--"]
                print(f"== nvidia-agent --root {root} daemon")
                daemon = subprocess.Popen([*enter, *gpus, *agent, "daemon"], cwd=REPO)
                status = subprocess.run([*agent, "status", "--wait", "60"], cwd=REPO, check=False)
                subprocess.run([*agent, "status", "--json"], cwd=REPO, check=False)
                print(f"== {root}/usr/lib64 inside the agent's mount namespace:")
                subprocess.run([*enter, "ls", "-l", str(root / "usr/lib64")], check=False)
                print(f"== {root}/opt/nvidia:")
                subprocess.run(["ls", "-l", str(root / "opt/nvidia")], check=False)
                pid = int((root / "run/nvidia-agent/agent.lock").read_text())
                os.kill(pid, signal.SIGTERM)
                daemon.wait(timeout=30)
                time.sleep(0.1)
            finally:
                subprocess.run(["umount", "--lazy", ns / "mnt"], check=False)
                subprocess.run(["umount", "--lazy", ns], check=False)
        return status.returncode


if __name__ == "__main__":
    raise SystemExit(main())
