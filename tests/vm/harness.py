"""VM tier: prove nvidia-agent's kernel-level behaviour in a real Debian guest under QEMU.

The guest is Debian 12 with systemd as PID 1, booted straight from one of two kernels of the
same release (`<ver>-amd64` and `<ver>-cloud-amd64`), so a reboot into the other one is a real
"kernel changed" boot. It has no network (`-nic none`); its driver images come from Debian's
docker-registry running *inside* the guest on 127.0.0.1:5000, filled on this host at build
time. The agent is installed the way a user would: in the `debian` variant a wheel in a venv,
the unit from `units/`, the defaults from `etc/` (README's plain-distribution recipe); in the
`fcos` and `flatcar` variants, a host that looks like CoreOS (no python3 at all, /usr mounted
read-only, /usr/local -> /var/usrlocal) gets only the system extension that packaging/build-sysext
builds, placed by the Ignition config packaging/deploy/<variant>.ign, and merged at boot by the real
systemd-sysext.service. Fake NVIDIA PCI devices come from `fake_gpu_pci.ko`
(see tests/vm/guest/), loaded early by `fake-gpu.service`.

    python -m tests.vm.harness setup [--variant fcos]  # build or reuse the cached guest image
    python -m tests.vm.harness run first_boot ... # run scenarios of tests/vm/test_vm.py
    python -m tests.vm.harness shell [--kernel cloud]  # boot a guest, type commands into it

    from tests.vm.harness import Guest
    with Guest(kernel="amd64") as g:
        rc, out = g.run("cat /proc/modules")
        g.reboot(kernel="cloud")
        g.collect(Path("out"))

Everything heavy is cached outside the clone, under $NVIDIA_AGENT_VM_CACHE
(default /var/cache/nvidia-agent-vm): the two kernels (unpacked, never installed on this
host), the debootstrapped rootfs (keyed by a hash of GUEST below), the driver images, the
agent's dependency wheels, and the final disk image (keyed by everything that goes in it).
Stdlib only; run as root (debootstrap, chroot, mkfs).
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import fcntl
import glob
import gzip
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("NVIDIA_AGENT_VM_CACHE", "/var/cache/nvidia-agent-vm"))
APT = ["apt-get", "-o", "DPkg::Lock::Timeout=600", "-y", "-qq"]

# Driver versions of the loadable (tiny, fake) images. DRIVER is what the guest is configured
# for; DRIVER2 is a second image for the amd64 kernel, used to request an upgrade.
DRIVER = "535.999.01"
DRIVER2 = "535.999.02"
GUEST_REGISTRY = "127.0.0.1:5000"
FAKE_GPUS = 2

# The guest's make-up. Its hash keys the cached rootfs: change anything here and the rootfs is
# rebuilt (kernel versions are added at run time, they come from the mirror).
GUEST: dict[str, Any] = {
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["systemd", "systemd-sysv", "udev", "python3", "python3-venv", "kmod", "dbus",
                "qemu-guest-agent", "docker-registry", "ca-certificates",
                # a CDI consumer (issue 11): `podman run --device nvidia.com/gpu=all` reads the agent's spec
                "podman", "netavark", "crun", "conmon",  # debootstrap does not pick providers of virtual packages
                # pydbus (an agent dependency) needs PyGObject: Debian's, seen through
                # the venv's --system-site-packages (building it needs a compiler and -dev packages)
                "python3-gi"],
    "mask": ["serial-getty@ttyS0.service", "getty@tty1.service", "apt-daily.timer",
             "apt-daily-upgrade.timer", "e2scrub_reap.service", "e2scrub_all.timer", "fstrim.timer",
             "podman-restart.service", "podman-auto-update.timer", "podman-clean-transient.service"],
    # kernel module directories left out of the guest (size); drm core stays for nvidia-drm.
    "trim": ["kernel/sound", "kernel/drivers/gpu/drm/amd", "kernel/drivers/gpu/drm/i915",
             "kernel/drivers/gpu/drm/nouveau", "kernel/drivers/gpu/drm/radeon",
             "kernel/drivers/net/wireless", "kernel/drivers/net/ethernet", "kernel/drivers/media",
             "kernel/drivers/infiniband", "kernel/drivers/staging", "kernel/drivers/usb",
             "kernel/drivers/bluetooth", "kernel/drivers/iio", "kernel/drivers/hid"],
    "initrd_modules": ["virtio_pci", "virtio_blk", "ext4"],
    "layout": 3,  # bump when the rootfs recipe below changes in a way the lists do not show
}
QEMU = {"machine": "q35", "smp": 2, "mem": 2048}
IMAGE_SIZE = "4G"

_T0 = time.monotonic()
TIMINGS: list[tuple[str, float]] = []


def log(msg: str) -> None:
    print(f"[vm t+{time.monotonic() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def timed(label: str, seconds: float) -> None:
    TIMINGS.append((label, seconds))
    log(f"{label}: {seconds:.1f}s")


@contextlib.contextmanager
def step(label: str) -> Iterator[None]:
    t = time.monotonic()
    yield
    timed(label, time.monotonic() - t)


def sh(*argv: str | Path, cwd: Path | None = None, quiet: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run a host command; on failure raise with its output."""
    args = [str(a) for a in argv]
    p = subprocess.run(args, cwd=cwd, text=True, capture_output=quiet, check=False, **kw)
    if p.returncode != 0:
        detail = f"\n{p.stdout}\n{p.stderr}" if quiet else ""
        raise RuntimeError(f"{shlex.join(args)} exited {p.returncode}{detail}")
    return p


def digest(*parts: str | bytes | Path) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            files = sorted(p for p in part.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
                if part.is_dir() else [part]
            for f in files:
                h.update(str(f.relative_to(REPO) if f.is_relative_to(REPO) else f).encode())
                h.update(f.read_bytes() if f.exists() else b"-")
        else:
            h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()[:12]


# --------------------------------------------------------------------------- host preparation

def _missing(pkgs: Sequence[str]) -> list[str]:
    return [p for p in pkgs if subprocess.run(["dpkg", "-s", p], capture_output=True, check=False).returncode != 0]


def _apt_install(pkgs: Sequence[str]) -> None:
    need = _missing(pkgs)
    if not need:
        return
    log(f"apt-get install {' '.join(need)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run([*APT, "install", "--no-install-recommends", *need], env=env, check=False).returncode != 0:
        sh(*APT, "update", env=env)
        sh(*APT, "install", "--no-install-recommends", *need, env=env, quiet=False)


HOST_PACKAGES = ["qemu-system-x86", "qemu-utils", "busybox-static", "debootstrap", "linux-headers-amd64",
                 "cpio", "kmod", "e2fsprogs", "util-linux",
                 # the driver images: module builds and the host-side registry/pushers
                 "build-essential", "docker-registry", "skopeo", "umoci"]


@dataclass(frozen=True)
class Kernels:
    amd64: str  # e.g. 6.1.0-56-amd64 (linux-headers-amd64's dependency)
    cloud: str  # e.g. 6.1.0-56-cloud-amd64

    def pick(self, kernel: str | None) -> str:
        if kernel in (None, "", "amd64", "default"):
            return self.amd64
        if kernel == "cloud":
            return self.cloud
        if kernel in (self.amd64, self.cloud):
            return kernel
        raise ValueError(f"unknown kernel {kernel!r}: use amd64, cloud, {self.amd64} or {self.cloud}")

    @property
    def both(self) -> tuple[str, str]:
        return (self.amd64, self.cloud)


def host_kernels() -> Kernels:
    dep = subprocess.run(["dpkg-query", "-W", "-f=${Depends}", "linux-headers-amd64"],
                         capture_output=True, text=True, check=False).stdout
    m = re.search(r"linux-headers-(\S+?-amd64)\b", dep)
    if not m:
        raise RuntimeError(f"cannot read the kernel ABI from linux-headers-amd64's Depends: {dep!r}")
    kver = m.group(1)
    return Kernels(kver, kver.removesuffix("-amd64") + "-cloud-amd64")


def host_packages() -> Kernels:
    with step("host packages"):
        _apt_install(HOST_PACKAGES)
        k = host_kernels()
        _apt_install([f"linux-headers-{k.cloud}"])
    log(f"kernels: {k.amd64} and {k.cloud}")
    return k


def kvm_usable() -> bool:
    """KVM only if /dev/kvm answers and it is not the paravirtual flavour (kvm_pvm) of this host."""
    if Path("/sys/module/kvm_pvm").exists() or os.environ.get("NVIDIA_AGENT_VM_TCG"):
        return False
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return fcntl.ioctl(fd, 0xAE00) == 12  # KVM_GET_API_VERSION
    except OSError:
        return False
    finally:
        os.close(fd)


def mirror() -> str:
    """This machine's Debian mirror, read from its apt sources at run time (never stored)."""
    for src in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for block in Path(src).read_text().split("\n\n"):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", block, re.M))
            if GUEST["suite"] in fields.get("Suites", "").split() and "Types" in fields:
                return fields["URIs"].split()[0]
    with contextlib.suppress(OSError):
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            f = line.split()
            if len(f) >= 3 and f[0] == "deb" and f[2] == GUEST["suite"]:
                return f[1]
    raise RuntimeError("no Debian mirror for bookworm in /etc/apt/sources.list.d/*.sources or sources.list")


def _apt_download(where: Path, *names: str, update: bool = False) -> bool:
    """`apt-get download` into `where`: whether it worked; with `update`, the package lists are
    refreshed first and a failure raises."""
    if update:
        sh(*APT, "update")
        sh("apt-get", "download", "-q", *names, cwd=where)
        return True
    return subprocess.run(["apt-get", "download", "-q", *names], cwd=where, capture_output=True,
                          check=False).returncode == 0


def kernel_dir(kver: str) -> Path:
    return CACHE / f"kernel-{kver}"


def fetch_kernel(kver: str) -> Path:
    """vmlinuz + modules of exactly kver, unpacked with dpkg-deb -x (never installed here)."""
    k = kernel_dir(kver)
    if (k / ".complete").exists():
        return k
    with step(f"kernel {kver} download+unpack"):
        tmp = CACHE / f"kernel-{kver}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if not any(_apt_download(tmp, name) for name in (f"linux-image-{kver}", f"linux-image-{kver}-unsigned")):
            _apt_download(tmp, f"linux-image-{kver}", update=True)
        deb = next(tmp.glob("linux-image-*.deb"))
        sh("dpkg-deb", "-x", deb, tmp)
        deb.unlink()
        sh("depmod", "-b", tmp, kver)
        (tmp / ".complete").touch()
        shutil.rmtree(k, ignore_errors=True)
        tmp.rename(k)
    return k


def vmlinuz(kver: str) -> Path:
    return kernel_dir(kver) / "boot" / f"vmlinuz-{kver}"


def kernel_debs(kver: str) -> Path:
    """The packages a guest installs with its own dpkg to get kernel `kver` the way an upgrade does:
    linux-image-<kver> (its postinst runs /etc/kernel/postinst.d/*) and linux-base (its
    linux-update-symlinks, which that postinst calls first). Downloaded once, never installed here."""
    d = CACHE / f"debs-{kver}"
    if (d / ".complete").exists():
        return d
    with step(f"kernel package {kver} download"):
        tmp = CACHE / f"debs-{kver}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if not _apt_download(tmp, "linux-base", f"linux-image-{kver}"):
            _apt_download(tmp, "linux-base", f"linux-image-{kver}", update=True)
        (tmp / ".complete").touch()
        shutil.rmtree(d, ignore_errors=True)
        tmp.rename(d)
    return d


# The initrd's /init. With `nvagent.usr=ro` on the kernel command line /usr is bound read-only
# before systemd starts, as Fedora CoreOS's initrd (ostree-prepare-root) leaves it; an fstab entry
# would be remounted by systemd-remount-fs, racing usr.mount, and could take / read-only with it.
INITRD_INIT = (
    "#!/bin/sh\n"
    "mount -t proc p /proc; mount -t sysfs s /sys; mount -t devtmpfs d /dev\n"
    "for m in $(cat /modlist); do insmod /lib/modules/$m 2>/dev/null; done\n"
    "i=0; while [ ! -b /dev/vda ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done\n"
    "mount -t ext4 -o rw /dev/vda /newroot || { echo 'initrd: cannot mount /dev/vda'; sh; }\n"
    "case \" $(cat /proc/cmdline) \" in *' nvagent.usr=ro '*)\n"
    "  mount -o bind /newroot/usr /newroot/usr && mount -o remount,bind,ro /newroot/usr"
    " || { echo 'initrd: cannot bind /usr read-only'; sh; } ;;\n"
    "esac\n"
    "umount /proc /sys; mount --move /dev /newroot/dev\n"
    "exec switch_root /newroot /sbin/init\n")


def initrd(kver: str) -> Path:
    """A busybox initrd: virtio + ext4 modules of kver, then switch_root into systemd."""
    out = CACHE / f"initrd-{kver}-{digest(json.dumps(GUEST['initrd_modules']), INITRD_INIT)}.cpio.gz"
    if out.exists():
        return out
    k = kernel_dir(kver)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        w = Path(tmp)
        for d in ("bin", "proc", "sys", "dev", "newroot", "lib/modules"):
            (w / d).mkdir(parents=True)
        shutil.copy("/bin/busybox", w / "bin/busybox")
        for a in ("sh", "mount", "umount", "insmod", "sleep", "switch_root", "cat"):
            (w / "bin" / a).symlink_to("busybox")
        paths: list[str] = []
        for m in GUEST["initrd_modules"]:
            shown = sh("modprobe", "-d", k, "-S", kver, "--show-depends", m).stdout
            for line in shown.splitlines():
                f = line.split()
                if f and f[0] == "insmod" and f[1] not in paths:
                    paths.append(f[1])
        for p in paths:
            shutil.copy(p, w / "lib/modules" / Path(p).name)
        (w / "modlist").write_text("".join(Path(p).name + "\n" for p in paths))
        (w / "init").write_text(INITRD_INIT)
        (w / "init").chmod(0o755)
        files = sh("find", ".", cwd=w).stdout
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=w, input=files.encode(),
                              capture_output=True, check=True).stdout
        tmp_out = out.with_suffix(".tmp")
        tmp_out.write_bytes(gzip.compress(cpio, compresslevel=1))
        tmp_out.rename(out)
    return out


# --------------------------------------------------------------------------- rootfs (cached)

def rootfs(kernels: Kernels) -> Path:
    """debootstrap + both kernels' (trimmed) module trees; cached by a hash of GUEST."""
    key = digest(json.dumps(GUEST, sort_keys=True), *kernels.both)
    r = CACHE / f"rootfs-{key}"
    if (r / ".complete").exists():
        log(f"rootfs cache hit: {r.name}")
        return r
    d = CACHE / "rootfs-build"
    shutil.rmtree(d, ignore_errors=True)
    with step("debootstrap"):
        logf = CACHE / "debootstrap.log"
        with logf.open("w") as f:
            p = subprocess.run(["debootstrap", f"--variant={GUEST['variant']}",
                                f"--include={','.join(GUEST['include'])}", GUEST["suite"], str(d), mirror()],
                               stdout=f, stderr=subprocess.STDOUT, check=False)
        if p.returncode != 0:
            raise RuntimeError(f"debootstrap failed; see {logf}:\n" + "".join(logf.read_text().splitlines(True)[-20:]))
    with step("rootfs configure"):
        # no mirror name and no package lists in the cache
        for pat in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*", "etc/apt/sources.list",
                    "etc/apt/sources.list.d/*"):
            for p in glob.glob(str(d / pat)):
                Path(p).unlink() if not Path(p).is_dir() else shutil.rmtree(p)
        (d / "etc/fstab").write_text("/dev/vda / ext4 rw,relatime 0 1\n")
        (d / "etc/hostname").write_text("nvagent-vm\n")
        (d / "etc/machine-id").write_text("")
        (d / "var/log/journal").mkdir(parents=True, exist_ok=True)  # persistent journal across reboots
        sh("chroot", d, "passwd", "-d", "root")
        sh("chroot", d, "systemctl", "mask", "-q", *GUEST["mask"])
        for kver in kernels.both:
            src = kernel_dir(kver) / "lib/modules" / kver
            dst = d / "lib/modules" / kver
            dst.mkdir(parents=True)
            excludes = [f"--exclude=./{t}" for t in GUEST["trim"]]
            tar = subprocess.Popen(["tar", "-C", str(src), "-cf", "-", *excludes, "."], stdout=subprocess.PIPE)
            sh("tar", "-C", dst, "-xf", "-", stdin=tar.stdout)
            tar.wait()
            sh("depmod", "-b", d, kver)
        (d / ".complete").touch()
    shutil.rmtree(r, ignore_errors=True)
    d.rename(r)
    for old in CACHE.glob("rootfs-*"):
        if old != r and old.is_dir() and old.name != "rootfs-build":
            shutil.rmtree(old, ignore_errors=True)
    log(f"rootfs cached: {r.name} ({sh('du', '-sh', r).stdout.split()[0]})")
    return r


# --------------------------------------------------------------------------- agent wheels

AGENT_SOURCES = [REPO / "pyproject.toml", REPO / "README.md", REPO / "agent"]
GUEST_FILES = [REPO / "units/nvidia-agent.service", REPO / "etc/nvidia-agent/00-defaults.toml"]


def agent_wheels() -> Path:
    """The agent's wheel (built from a copy of the tree) plus its dependencies as wheels."""
    pyproject = (REPO / "pyproject.toml").read_bytes()
    deps = CACHE / f"wheels-deps-{digest(pyproject)}"
    w = CACHE / f"wheels-{digest(*AGENT_SOURCES)}"
    if (w / ".complete").exists() and (deps / ".complete").exists():
        return w
    py = REPO / ".venv/bin/python"
    py_s = str(py) if py.exists() else sys.executable
    with step("agent wheel"), tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for p in AGENT_SOURCES:
            if p.is_dir():
                shutil.copytree(p, src / p.name, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(p, src / p.name)
        shutil.rmtree(w, ignore_errors=True)
        sh(py_s, "-m", "pip", "wheel", "-q", "--no-deps", "-w", w, src)
    if not (deps / ".complete").exists():
        with step("agent dependency wheels (pip download)"):
            shutil.rmtree(deps, ignore_errors=True)
            wheel = next(w.glob("nvidia_agent-*.whl"))
            sh(py_s, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", deps, wheel)
            for own in deps.glob("nvidia_agent-*.whl"):
                own.unlink()
            (deps / ".complete").touch()
    (w / ".complete").touch()
    return w


# --------------------------------------------------------------------------- driver images

def _build_trees_module() -> Any:
    sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
    try:
        from tests.vm import build_trees  # noqa: PLC0415 - written in parallel, may be missing
    except ImportError as exc:
        raise RuntimeError(f"tests/vm/build_trees.py is not there yet ({exc}): "
                           "it builds the driver trees and fake_gpu_pci.ko") from exc
    return build_trees


def real_tree_cached(kver: str) -> bool:
    """build_trees caches the real driver tree in <cache>/real-<kver>/ (tree/ + key.json)."""
    return (CACHE / f"real-{kver}" / "tree").is_dir() and (CACHE / f"real-{kver}" / "key.json").is_file()


def want_real(kernels: Kernels) -> bool:
    """The real 535 scenario runs unless NVIDIA_AGENT_REAL_DRIVER=0 (its first build takes ~4-5 min)."""
    return os.environ.get("NVIDIA_AGENT_REAL_DRIVER", "1") != "0" or real_tree_cached(kernels.amd64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def host_registry(storage: Path) -> Iterator[str]:
    """Debian's docker-registry on 127.0.0.1:<free port>, storage under the cache; stopped by PID."""
    port = _free_port()
    cfg = storage.parent / "registry-config.yml"
    cfg.write_text("version: 0.1\nlog: {level: warn}\n"
                   f"storage: {{filesystem: {{rootdirectory: {storage}}}, delete: {{enabled: true}}}}\n"
                   f"http: {{addr: 127.0.0.1:{port}}}\n")
    logf = (storage.parent / "registry.log").open("w")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=logf, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"host registry did not come up; see {logf.name}") from None
                time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        logf.close()


def driver_images(kernels: Kernels) -> Path:
    """Registry storage holding every image the scenarios pull, plus fake_gpu_pci-<kver>.ko.

    Loadable DRIVER for both kernels, DRIVER2 for the amd64 one, the real driver's image when
    wanted. Cached by the content of whatever builds them.
    """
    real = want_real(kernels)
    real_key = CACHE / f"real-{kernels.amd64}" / "key.json"
    key = digest(HERE / "guest", HERE / "build_trees.py", REPO / "packaging/build-driver-image",
                 DRIVER, DRIVER2, *kernels.both, f"real={real}", real_key if real else "")
    out = CACHE / "trees" / f"images-{key}"
    if (out / ".complete").exists():
        log(f"driver images cache hit: {out.name}")
        return out
    bt = _build_trees_module()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    trees: list[Path] = []
    info: dict[str, Any] = {"loadable": {}, "real": None}
    for kver, driver in [(kernels.amd64, DRIVER), (kernels.cloud, DRIVER), (kernels.amd64, DRIVER2)]:
        with step(f"loadable tree {driver} for {kver}"):
            tdir = out / f"build-{driver}-{kver}"
            tree = Path(bt.build_loadable_tree(kver, tdir, driver=driver))
            trees.append(tree)
            ko = tdir / f"fake_gpu_pci-{kver}.ko"
            if ko.exists() and not (out / ko.name).exists():
                shutil.copy(ko, out / ko.name)
            info["loadable"].setdefault(driver, []).append(kver)
    if real:
        with step(f"real driver tree for {kernels.amd64} (cached after the first build)"):
            tree = Path(bt.build_real_tree(kernels.amd64))  # the cached tree itself, read-only
        trees.append(tree)
        info["real"] = {"kernel": kernels.amd64, "driver": bt.tree_driver(tree)}
    storage = out / "registry"
    storage.mkdir()
    with step(f"push {len(trees)} driver images"), host_registry(storage) as reg:
        bt.push_trees(reg, *trees)
    (out / "images.json").write_text(json.dumps(info, indent=2))
    for p in out.glob("build-*"):
        shutil.rmtree(p, ignore_errors=True)
    (out / ".complete").touch()
    return out


def images_info() -> dict[str, Any]:
    """What the cached guest image's registry holds (written by driver_images)."""
    meta = CACHE / "image.json"
    return json.loads(meta.read_text())["images"] if meta.exists() else {"loadable": {}, "real": None}


# --------------------------------------------------------------------------- guest image

VM_TOML = f"""\
# VM test host: the driver comes from the registry inside this guest.
[driver]
version = "{DRIVER}"

[image]
registry = "{GUEST_REGISTRY}"
plain_http = ["{GUEST_REGISTRY}"]
timeout_s = 10.0
attempts = 3

[mount]
target = "/usr/lib64"

[modules]
load = true

[daemon]
retry_initial_s = 2.0
retry_max_s = 10.0
"""

REGISTRY_YML = f"""\
version: 0.1
log: {{level: info}}
storage:
  filesystem: {{rootdirectory: /var/lib/docker-registry}}
  delete: {{enabled: true}}
http: {{addr: {GUEST_REGISTRY}}}
"""

REGISTRY_UNIT = """\
[Unit]
Description=Driver image registry on 127.0.0.1:5000 (nvidia-agent VM tests; no traffic leaves the guest)
Before=nvidia-agent.service

[Service]
User=docker-registry
ExecStart=/usr/bin/docker-registry serve /etc/docker/registry/config.yml

[Install]
WantedBy=multi-user.target
"""

FAKE_GPU_UNIT = f"""\
[Unit]
Description=Fake NVIDIA PCI devices ({FAKE_GPUS} GPUs, vendor 0x10de) for the nvidia-agent VM tests
DefaultDependencies=no
After=systemd-udevd.service
Before=sysinit.target nvidia-agent.service
ConditionPathExists=/usr/lib/nvidia-agent-vm/fake_gpu_pci-%v.ko

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/sbin/insmod /usr/lib/nvidia-agent-vm/fake_gpu_pci-%v.ko gpus={FAKE_GPUS}

[Install]
WantedBy=sysinit.target
"""

# Stand-ins for the agent's default consumers (units.before). Each records, at the moment it
# starts, whether the driver was there. They carry no After=/Wants= on nvidia-agent themselves:
# their ordering must come from the agent's own unit (Before=) and the drop-ins it writes.
STANDINS = ("kubelet", "dcos-mesos-slave")
STANDIN_SEEN = "/usr/lib/nvidia-agent-vm/standin-seen"

STANDIN_SCRIPT = """\
#!/bin/sh
# Usage: standin-seen UNIT. Appends to /var/log/UNIT.seen what UNIT found when it started:
# "<uptime s> module=yes|no version=<v>|- nvidiactl=yes|no nvidia0=yes|no"
read up _ < /proc/uptime
m=no; [ -e /sys/module/nvidia ] && m=yes
v=$(cat /sys/module/nvidia/version 2>/dev/null || echo -)
c=no; [ -c /dev/nvidiactl ] && c=yes
g=no; [ -c /dev/nvidia0 ] && g=yes
echo "$up module=$m version=$v nvidiactl=$c nvidia0=$g" >> "/var/log/$1.seen"
"""

STANDIN_UNIT = """\
[Unit]
Description=Stand-in for %N (nvidia-agent VM tests): records whether the NVIDIA driver was there when it started

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/lib/nvidia-agent-vm/standin-seen %N

[Install]
WantedBy=multi-user.target
"""


def put(root: Path, rel: str, text: str | bytes, mode: int = 0o644) -> Path:
    """Write a file in a hard-linked copy of the cached rootfs without touching the cache."""
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.exists() or p.is_symlink():
        p.unlink()
    p.write_bytes(text.encode() if isinstance(text, str) else text)
    p.chmod(mode)
    return p


def _chroot(root: Path, script: str) -> None:
    """Run a shell script chrooted into root with /proc and /dev, in a private mount namespace."""
    r = shlex.quote(str(root))
    sh("unshare", "--mount", "--propagation", "private", "--fork", "sh", "-ec",
       f"mount -t proc proc {r}/proc; mount --rbind /dev {r}/dev; "
       f"chroot {r} /bin/sh -ec {shlex.quote(script)}")


def _guest_ids(root: Path, user: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        f = line.split(":")
        if f[0] == user:
            return int(f[2]), int(f[3])
    raise RuntimeError(f"no user {user} in the guest")


VARIANTS = ("debian", "fcos", "flatcar")


def build_image(force: bool = False, variant: str = "debian") -> Path:
    """Build (or reuse) a guest disk image; returns the raw image path. Prints timings.

    debian: the agent installed as README's plain-distribution recipe does (a venv from wheels).
    fcos, flatcar: a host like CoreOS (no python3, /usr read-only, /usr/local -> /var/usrlocal) with
    the agent only as the system extension that packaging/build-sysext builds, placed by the
    Ignition config packaging/deploy/<variant>.ign applied as Ignition's files stage would.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown guest variant {variant!r}: {', '.join(VARIANTS)}")
    t = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    kernels = host_packages()
    for kver in kernels.both:
        fetch_kernel(kver)
        initrd(kver)
    base = rootfs(kernels)
    images = driver_images(kernels)
    common = [base.name, images.name, Path(__file__), VM_TOML, REGISTRY_YML, REGISTRY_UNIT, FAKE_GPU_UNIT,
              STANDIN_SCRIPT, STANDIN_UNIT]
    if variant == "debian":
        wheels = agent_wheels()
        deps = CACHE / f"wheels-deps-{digest((REPO / 'pyproject.toml').read_bytes())}"
        debs = kernel_debs(kernels.cloud)
        key = digest(*common, wheels.name, deps.name, *GUEST_FILES, *UPDATE_FILES, debs.name)
    else:
        raw = agent_sysext()
        key = digest(*common, raw.parent.name, *SYSEXT_GUEST_FILES)
    img = CACHE / f"guest-{variant}-{key}.raw"
    if img.exists() and not force:
        log(f"guest image cache hit: {img.name}")
    else:
        with step(f"guest image {variant} (agent install + mkfs)"):
            if variant == "debian":
                root = _assemble(base, images, wheels=wheels, deps=deps)
                _updates(root, kernels, debs)
                _mkfs(root, img)
            else:
                _assemble_coreos_like(base, images, raw=raw, variant=variant, img=img)
        for old in CACHE.glob(f"guest-{variant}-*.raw"):
            if old != img:
                old.unlink()
    meta = {"image": str(img), "kernels": {"amd64": kernels.amd64, "cloud": kernels.cloud},
            "images": json.loads((images / "images.json").read_text()), "key": key}
    _meta_path(variant).write_text(json.dumps(meta, indent=2))
    timed("setup total", time.monotonic() - t)
    return img


def _meta_path(variant: str) -> Path:
    return CACHE / ("image.json" if variant == "debian" else f"image-{variant}.json")


def _assemble(base: Path, images: Path, *, wheels: Path, deps: Path) -> Path:
    """The Debian guest's root with the agent installed as README's plain-distribution recipe says."""
    root = CACHE / "img-root"
    shutil.rmtree(root, ignore_errors=True)
    sh("cp", "-al", base, root)  # hard links: every file changed below is replaced, never edited
    (root / ".complete").unlink()
    # the agent, as a user installs it: a venv from wheels, the unit, the vendor defaults
    w = root / "tmp/wheels"
    w.mkdir(parents=True)
    for f in [*wheels.glob("*.whl"), *deps.glob("*.whl")]:
        shutil.copy(f, w / f.name)
    _chroot(root, "python3 -m venv --system-site-packages /opt/nvidia-agent; "
                  "/opt/nvidia-agent/bin/pip install -q --no-index --find-links /tmp/wheels nvidia-agent; "
                  "ln -sf /opt/nvidia-agent/bin/nvidia-agent /usr/bin/nvidia-agent; "
                  "/usr/bin/nvidia-agent --version")
    shutil.rmtree(w)
    put(root, "etc/systemd/system/nvidia-agent.service", (REPO / "units/nvidia-agent.service").read_bytes())
    put(root, "usr/lib/nvidia-agent/config.d/00-defaults.toml",
        (REPO / "etc/nvidia-agent/00-defaults.toml").read_bytes())
    put(root, "etc/nvidia-agent/config.d/50-vm.toml", VM_TOML)
    # README's kernel hook: a kernel package asks the agent for its driver before the reboot
    put(root, "etc/kernel/postinst.d/nvidia-agent", (REPO / "packaging/kernel/postinst.d/nvidia-agent").read_bytes(),
        mode=0o755)
    _test_infrastructure(root, images)
    sh("systemctl", f"--root={root}", "enable", "-q", "nvidia-agent.service")
    return root


UPDATE_FILES = [REPO / "packaging/kernel/postinst.d/nvidia-agent", HERE / "update_engine_standin.py",
                REPO / "tests/fixtures/update/update_engine.xml", HERE / "rpm_ostree_standin.py",
                REPO / "tests/fixtures/update/rpm-ostree-sysroot.xml", HERE / "gio_standin.py"]
UPDATE_ENGINE_POLICY = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- as flatcar/update_engine's com.coreos.update1.conf: root owns and calls it (nvidia-agent VM tests) -->
<busconfig>
  <policy user="root">
    <allow own="com.coreos.update1"/>
    <allow send_destination="com.coreos.update1"/>
  </policy>
</busconfig>
"""
RPM_OSTREE_POLICY = """\
<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- as rpm-ostree's org.projectatomic.rpmostree1.conf: root owns it, anyone may ask (nvidia-agent VM tests) -->
<busconfig>
  <policy user="root">
    <allow own="org.projectatomic.rpmostree1"/>
  </policy>
  <policy context="default">
    <allow send_destination="org.projectatomic.rpmostree1"/>
  </policy>
</busconfig>
"""
RPM_OSTREE_UNIT = """\
[Unit]
Description=Stand-in for rpm-ostreed's Sysroot on the system bus (nvidia-agent VM tests)

[Service]
Type=dbus
BusName=org.projectatomic.rpmostree1
ExecStart=/usr/bin/python3 /usr/lib/nvidia-agent-vm/rpm_ostree_standin.py
"""
UPDATE_ENGINE_UNIT = """\
[Unit]
Description=Stand-in for Flatcar's update_engine on the system bus (nvidia-agent VM tests)

[Service]
Type=dbus
BusName=com.coreos.update1
ExecStart=/usr/bin/python3 /usr/lib/nvidia-agent-vm/update_engine_standin.py

[Install]
WantedBy=multi-user.target
"""


def _updates(root: Path, kernels: Kernels, debs: Path) -> None:
    """What the OS-update scenarios (tests/vm/test_vm_update.py) need in the Debian guest: the other
    kernel's packages for the guest's dpkg, both kernel images (a Flatcar-like host's
    /boot/flatcar/vmlinuz-a and -b, an ostree deployment's vmlinuz), and the stand-ins of
    update_engine and rpm-ostreed (not enabled)."""
    for deb in debs.glob("*.deb"):
        put(root, f"usr/lib/nvidia-agent-vm/debs/{deb.name}", deb.read_bytes())
    for kver in kernels.both:
        put(root, f"usr/lib/nvidia-agent-vm/vmlinuz-{kver}", vmlinuz(kver).read_bytes())
    put(root, "usr/lib/nvidia-agent-vm/gio_standin.py", (HERE / "gio_standin.py").read_bytes())
    put(root, "usr/lib/nvidia-agent-vm/update_engine_standin.py", (HERE / "update_engine_standin.py").read_bytes(),
        mode=0o755)
    put(root, "usr/lib/nvidia-agent-vm/update_engine.xml",
        (REPO / "tests/fixtures/update/update_engine.xml").read_bytes())
    put(root, "etc/dbus-1/system.d/com.coreos.update1.conf", UPDATE_ENGINE_POLICY)
    put(root, "etc/systemd/system/update-engine.service", UPDATE_ENGINE_UNIT)
    put(root, "usr/lib/nvidia-agent-vm/rpm_ostree_standin.py", (HERE / "rpm_ostree_standin.py").read_bytes(),
        mode=0o755)
    put(root, "usr/lib/nvidia-agent-vm/rpm-ostree-sysroot.xml",
        (REPO / "tests/fixtures/update/rpm-ostree-sysroot.xml").read_bytes())
    put(root, "etc/dbus-1/system.d/org.projectatomic.rpmostree1.conf", RPM_OSTREE_POLICY)
    put(root, "etc/systemd/system/rpm-ostreed.service", RPM_OSTREE_UNIT)


def _test_infrastructure(root: Path, images: Path) -> None:
    """What the scenarios need beside the agent: the registry inside the guest, fake GPUs, stand-ins."""
    put(root, "etc/ld.so.conf.d/lib64.conf", "/usr/lib64\n")  # like a lib64 distro
    (root / "usr/lib64").mkdir(exist_ok=True)
    # the registry inside the guest, with the images pushed on this host
    put(root, "etc/docker/registry/config.yml", REGISTRY_YML)
    put(root, "etc/systemd/system/docker-registry.service", REGISTRY_UNIT)
    data = root / "var/lib/docker-registry"
    shutil.rmtree(data, ignore_errors=True)
    shutil.copytree(images / "registry", data, symlinks=True)
    uid, gid = _guest_ids(root, "docker-registry")
    sh("chown", "-R", f"{uid}:{gid}", data)
    # fake NVIDIA GPUs, one module per kernel
    for ko in images.glob("fake_gpu_pci-*.ko"):
        put(root, f"usr/lib/nvidia-agent-vm/{ko.name}", ko.read_bytes())
    put(root, "etc/systemd/system/fake-gpu.service", FAKE_GPU_UNIT)
    put(root, "usr/lib/nvidia-agent-vm/images.json", (images / "images.json").read_bytes())
    # kubelet and dcos-mesos-slave stand-ins (oneshot, enabled), ordered only by the agent's side
    put(root, STANDIN_SEEN, STANDIN_SCRIPT, mode=0o755)
    for unit in STANDINS:
        put(root, f"etc/systemd/system/{unit}.service", STANDIN_UNIT)
    sh("systemctl", f"--root={root}", "enable", "-q", "docker-registry.service", "fake-gpu.service",
       *(f"{u}.service" for u in STANDINS))
    # what fleet tools would have set up: node_exporter's textfile directory, NFD's features.d; and a
    # container image for podman to run (busybox, imported in the guest: no registry for it there)
    for d in ("var/lib/node_exporter/textfile_collector", "etc/kubernetes/node-feature-discovery/features.d"):
        (root / d).mkdir(parents=True, exist_ok=True)
    put(root, "usr/lib/nvidia-agent-vm/probe.tar", probe_image())


def probe_image() -> bytes:
    """A root filesystem tarball for `podman import`: busybox (static) and its applets."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = Path("/bin/busybox").read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
        for applet in ("sh", "ls", "cat", "head", "test"):
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type, link.linkname, link.mtime = tarfile.SYMTYPE, "busybox", 0
            tar.addfile(link)
    return out.getvalue()


def _mkfs(root: Path, img: Path) -> None:
    img.unlink(missing_ok=True)
    tmp = img.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    sh("truncate", "-s", IMAGE_SIZE, tmp)
    sh("mkfs.ext4", "-q", "-F", "-L", "nvagent-vm", "-d", root, tmp)
    tmp.rename(img)
    shutil.rmtree(root)


# Every Python package of the Debian rootfs: a CoreOS-like guest has none (the extension brings its own).
PYTHON_PACKAGES = ["python3", "python3-minimal", "python3.11", "python3.11-minimal", "libpython3.11-minimal",
                   "libpython3.11-stdlib", "libpython3-stdlib", "python3-gi", "python3-venv", "python3.11-venv",
                   "python3-distutils", "python3-lib2to3", "python3-pip-whl", "python3-setuptools-whl"]
SYSEXT_GUEST_FILES = [REPO / "packaging/deploy", HERE.parent / "support/ignition.py"]
EXTENSION_URL = "https://downloads.example.com/nvidia-agent/"


def _assemble_coreos_like(base: Path, images: Path, *, raw: Path, variant: str, img: Path) -> None:
    """The Debian rootfs made to look like CoreOS, then the recipe packaging/deploy/<variant>.ign applied."""
    sys.path.insert(0, str(REPO)) if str(REPO) not in sys.path else None
    from tests.support import ignition  # noqa: PLC0415 - stdlib only, beside the harness

    root = CACHE / f"img-root-{variant}"
    shutil.rmtree(root, ignore_errors=True)
    sh("cp", "-a", base, root)  # a real copy: dpkg below appends to files the cache holds
    (root / ".complete").unlink()
    _chroot(root, "DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq --auto-remove "
                  + " ".join(PYTHON_PACKAGES) + " >/dev/null; rm -rf /usr/lib/python3 /usr/local/lib/python3*;"
                  " ! command -v python3 && ! ls /usr/bin/python* /usr/lib/python3* 2>/dev/null")
    # /usr/local is /var/usrlocal, as on Fedora CoreOS: the one writable place on root's PATH
    shutil.move(root / "usr/local", root / "var/usrlocal")
    (root / "usr/local").symlink_to("../var/usrlocal")
    # /usr is bound read-only by the initrd (Guest passes nvagent.usr=ro for this variant)
    put(root, "etc/nvidia-agent/config.d/55-vm.toml", VM_TOML)  # after the recipe's 50-registry.toml
    _test_infrastructure(root, images)
    if variant == "flatcar":  # what Flatcar itself ships: the merge at boot and its ensure-sysext.service
        put(root, "usr/lib/systemd/system/ensure-sysext.service",
            (REPO / "packaging/deploy/ensure-sysext.service").read_bytes())
        sh("systemctl", f"--root={root}", "enable", "-q", "systemd-sysext.service", "ensure-sysext.service")
    config = json.loads((REPO / f"packaging/deploy/{variant}.ign").read_text())
    written = ignition.apply(config, root, {EXTENSION_URL + raw.name: raw})
    log(f"applied packaging/deploy/{variant}.ign: {', '.join(written)}")
    _mkfs(root, img)


SYSEXT_SOURCES = [*AGENT_SOURCES, REPO / "packaging/build-sysext", *GUEST_FILES]


def agent_sysext() -> Path:
    """The system extension image, built by packaging/build-sysext (cached by what goes in it); the
    tree it was packed from is kept beside it as `tree/` (tests/test_sysext.py runs the agent from it)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    d = CACHE / f"sysext-{digest(*SYSEXT_SOURCES)}"
    if (d / ".complete").exists():
        return next(d.glob("nvidia-agent-*.raw"))
    py = REPO / ".venv/bin/python"
    with step("system extension (packaging/build-sysext)"):
        shutil.rmtree(d, ignore_errors=True)
        sh(py if py.exists() else sys.executable, REPO / "packaging/build-sysext", "--out", d, "--keep-tree",
           d / "tree")
        (d / ".complete").touch()
    for old in CACHE.glob("sysext-*"):
        if old != d:
            shutil.rmtree(old, ignore_errors=True)
    return next(d.glob("nvidia-agent-*.raw"))


def current_image(variant: str = "debian") -> tuple[Path, Kernels]:
    meta_p = _meta_path(variant)
    if not meta_p.exists():
        raise RuntimeError(f"no {variant} guest image in {CACHE}: run `python -m tests.vm.harness setup "
                           f"--variant {variant}`")
    meta = json.loads(meta_p.read_text())
    img = Path(meta["image"])
    if not img.exists():
        raise RuntimeError(f"{img} is gone: run `python -m tests.vm.harness setup`")
    return img, Kernels(meta["kernels"]["amd64"], meta["kernels"]["cloud"])


# --------------------------------------------------------------------------- running a guest

class QGA:
    """qemu-guest-agent over a virtio-serial unix socket."""

    def __init__(self, path: Path) -> None:
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(str(path))
        self.buf = b""

    def close(self) -> None:
        self.s.close()

    def _readline(self, timeout: float) -> bytes:
        self.s.settimeout(timeout)
        while b"\n" not in self.buf:
            d = self.s.recv(65536)
            if not d:
                raise EOFError("qga socket closed")
            self.buf += d
        line, self.buf = self.buf.split(b"\n", 1)
        return line

    def cmd(self, execute: str, timeout: float = 30, **args: Any) -> Any:
        msg: dict[str, Any] = {"execute": execute}
        if args:
            msg["arguments"] = args
        self.s.sendall(json.dumps(msg).encode() + b"\n")
        if execute == "guest-shutdown":
            return None
        while True:
            line = self._readline(timeout).strip().lstrip(b"\xff")
            if not line:
                continue
            r = json.loads(line)
            if "error" in r:
                raise RuntimeError(f"qga {execute}: {r['error']}")
            if "return" in r:
                return r["return"]

    def sync(self, timeout: float = 2) -> None:
        n = int(time.time() * 1000) % 100000000
        self.s.sendall(b"\xff" + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": n}}).encode()
                       + b"\n")
        while True:
            line = self._readline(timeout).strip().lstrip(b"\xff")
            if line and json.loads(line).get("return") == n:
                return


class Guest:
    """One scenario's guest: its own copy-on-write disk (kept across reboots), one kernel per boot."""

    def __init__(self, kernel: str | None = "amd64", name: str = "guest", workdir: Path | None = None, *,
                 boot_timeout: float = 600, max_runtime: int = 3600, variant: str = "debian") -> None:
        self.variant = variant
        self.image, self.kernels = current_image(variant)
        self.kernel = self.kernels.pick(kernel)
        self.name = name
        self.dir = workdir or Path(tempfile.mkdtemp(prefix=f"{name}-", dir=CACHE / "runs" if _mk(CACHE / "runs")
                                                    else None))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.disk = self.dir / "disk.qcow2"
        self.boot_timeout, self.max_runtime = boot_timeout, max_runtime
        self.proc: subprocess.Popen[bytes] | None = None
        self.qga: QGA | None = None
        self.boots = 0
        self.accel = "kvm" if kvm_usable() else "tcg"

    # -- lifecycle
    def __enter__(self) -> Guest:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def start(self) -> None:
        if not self.disk.exists():
            sh("qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", self.image, self.disk)
        self._boot()

    def argv(self) -> list[str]:
        qga, qmp = self.dir / "qga.sock", self.dir / "qmp.sock"
        accel = (["-accel", "tcg,thread=multi", "-cpu", "max"] if self.accel == "tcg"
                 else ["-accel", "kvm", "-cpu", "host"])
        # --foreground: qemu stays in our process group, so killing the run kills the guest too
        return ["timeout", "--foreground", "-k", "10", str(self.max_runtime), "qemu-system-x86_64", *accel,
                "-machine", QEMU["machine"], "-smp", str(QEMU["smp"]), "-m", str(QEMU["mem"]),
                "-display", "none", "-no-reboot", "-nic", "none",
                "-serial", f"file:{self.dir / f'console-{self.boots}.log'}",
                "-kernel", str(vmlinuz(self.kernel)), "-initrd", str(initrd(self.kernel)),
                "-append", "root=/dev/vda rw console=ttyS0 panic=-1 quiet"
                + (" nvagent.usr=ro" if self.variant != "debian" else ""),
                "-drive", f"file={self.disk},if=virtio,format=qcow2,cache=unsafe",
                "-chardev", f"socket,path={qga},server=on,wait=off,id=qga0",
                "-device", "virtio-serial", "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
                "-qmp", f"unix:{qmp},server=on,wait=off"]

    def _boot(self) -> None:
        self.boots += 1
        for s in ("qga.sock", "qmp.sock"):
            (self.dir / s).unlink(missing_ok=True)
        t0 = time.monotonic()
        log(f"{self.name}: boot #{self.boots} kernel {self.kernel} ({self.accel}), disk {self.disk}")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=(self.dir / f"qemu-{self.boots}.stderr").open("w"))
        _RUNNING.add(self.proc)
        deadline = t0 + self.boot_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"qemu exited rc={self.proc.returncode}: {self._console_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest agent did not answer in {self.boot_timeout:.0f}s: {self._console_tail()}")
            try:
                self.qga = QGA(self.dir / "qga.sock")
                self.qga.sync(timeout=2)
                break
            except (OSError, EOFError, ValueError):
                if self.qga:
                    self.qga.close()
                    self.qga = None
                time.sleep(0.5)
        timed(f"boot #{self.boots} {self.kernel}: guest agent answers", time.monotonic() - t0)
        # basic.target, not is-system-running --wait: boot completes only once the Type=notify
        # agent is READY, which is what the scenarios measure on their own
        _, out = self.run("for i in $(seq 240); do systemctl is-active -q basic.target && break; sleep 0.5; done;"
                          " systemctl is-system-running", quiet=True, timeout=150)
        self.t_up = time.monotonic() - t0
        timed(f"boot #{self.boots} {self.kernel}: systemd up (basic.target; system {out.strip()})", self.t_up)
        _, mono = self.run("systemctl show -P UserspaceTimestampMonotonic -P FinishTimestampMonotonic",
                           quiet=True)
        vals = [int(v) / 1e6 for v in mono.split() if v.isdigit()]
        if len(vals) == 2 and vals[1] > 0:
            log(f"  in guest: userspace at {vals[0]:.1f}s, startup finished at {vals[1]:.1f}s after kernel start")

    def wait_agent_active(self, timeout: float = 300) -> float:
        """Seconds after kernel start at which nvidia-agent.service entered active (guest clock)."""
        deadline = time.monotonic() + timeout
        while True:
            _, out = self.run("systemctl show -P ActiveState -P ActiveEnterTimestampMonotonic nvidia-agent",
                              quiet=True)
            f = out.split()
            if f and f[0] == "active" and len(f) > 1 and f[1].isdigit():
                at = int(f[1]) / 1e6
                timed(f"boot #{self.boots} {self.kernel}: nvidia-agent active (guest clock)", at)
                return at
            if time.monotonic() > deadline:
                raise TimeoutError(f"nvidia-agent not active after {timeout:.0f}s: {out.strip()}")
            time.sleep(1)

    def shutdown(self, timeout: float = 120) -> None:
        if self.proc and self.proc.poll() is None:
            t = time.monotonic()
            try:
                assert self.qga is not None
                self.qga.cmd("guest-shutdown", mode="powerdown")
                self.proc.wait(timeout)
            except Exception:  # a wedged guest: the disk is per scenario, losing it is fine
                _kill(self.proc)
            timed(f"{self.name}: shutdown", time.monotonic() - t)
        if self.qga:
            self.qga.close()
            self.qga = None

    def reboot(self, kernel: str | None = None) -> None:
        """A clean reboot from inside (systemctl reboot), then boot `kernel` (default: the same)."""
        assert self.proc is not None and self.qga is not None
        t = time.monotonic()
        self.qga.cmd("guest-shutdown", mode="reboot")
        try:
            self.proc.wait(180)  # -no-reboot: qemu exits when the guest reboots
        except subprocess.TimeoutExpired:
            _kill(self.proc)
        self.qga.close()
        self.qga = None
        timed(f"{self.name}: reboot (shutdown part)", time.monotonic() - t)
        if kernel is not None:
            self.kernel = self.kernels.pick(kernel)
        self._boot()

    def _console_tail(self, n: int = 30) -> str:
        p = self.dir / f"console-{self.boots}.log"
        lines = p.read_text(errors="replace").splitlines()[-n:] if p.exists() else []
        return f"console {p}:\n" + "\n".join(lines)

    # -- commands
    def run(self, cmd: str, timeout: float = 120, check: bool = False, quiet: bool = False,
            input_data: bytes | None = None) -> tuple[int, str]:
        """Run `sh -c cmd` as root in the guest; returns (exit status, stdout+stderr)."""
        assert self.qga is not None, "guest not running"
        t = time.monotonic()
        args: dict[str, Any] = {"path": "/bin/sh", "arg": ["-c", f"exec 2>&1; {cmd}"], "capture-output": True}
        if input_data is not None:
            args["input-data"] = base64.b64encode(input_data).decode()
        pid = self.qga.cmd("guest-exec", **args)["pid"]
        deadline = t + timeout
        delay = 0.02
        while True:
            st = self.qga.cmd("guest-exec-status", pid=pid)
            if st.get("exited"):
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest command ran past {timeout:.0f}s: {cmd}")
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        rc = int(st.get("exitcode", -1))
        if not quiet:
            log(f"  ({time.monotonic() - t:.2f}s rc={rc}) $ {cmd}")
        if check and rc != 0:
            raise RuntimeError(f"guest command failed rc={rc}: {cmd}\n{out}")
        return rc, out

    def status(self) -> dict[str, Any] | None:
        """`nvidia-agent status --json`, or None when the daemon does not answer."""
        _, out = self.run("nvidia-agent status --json 2>/dev/null", quiet=True)
        try:
            return json.loads(out) if out.strip() else None
        except ValueError:
            return None

    def wait_phase(self, phases: Sequence[str] = ("ready",), timeout: float = 300,
                   since: float | None = None) -> dict[str, Any]:
        """Poll the status until its phase is one of `phases` (and, with since, reconciled after it)."""
        t = time.monotonic()
        deadline = t + timeout
        st: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            st = self.status()
            if st and st.get("phase") in phases and (since is None or (st.get("phase_since") or 0) >= since):
                timed(f"{self.name}: agent reached {st['phase']} (host wait)", time.monotonic() - t)
                return st
            time.sleep(2)
        raise TimeoutError(f"agent not in {list(phases)} after {timeout:.0f}s; last status: "
                           f"{json.dumps(st, indent=1) if st else 'unreachable'}")

    def journal(self, unit: str = "nvidia-agent", boot: str = "-b") -> str:
        return self.run(f"journalctl -u {unit} {boot} --no-pager -o cat", quiet=True)[1]

    def guest_time(self) -> float:
        return float(self.run("date +%s.%N", quiet=True)[1].strip())

    def show(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p P1 -p P2 UNIT` as a dict (what systemd itself recorded)."""
        _, out = self.run(f"systemctl show {' '.join(f'-p {p}' for p in props)} {unit}", quiet=True)
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def put(self, path: str, text: str, mode: str = "644") -> None:
        """Write a file in the guest (parents created)."""
        q = shlex.quote(path)
        self.run(f"mkdir -p $(dirname {q}) && cat > {q} && chmod {mode} {q}", check=True, quiet=True,
                 input_data=text.encode())

    def tag_image(self, repository: str, src: str, dst: str, registry: str = GUEST_REGISTRY) -> str:
        """Publish `repository:src` under the new tag `dst` in the guest's registry (manifest GET + PUT,
        as a pipeline pushing a late image would); returns the pushed manifest's digest."""
        rc, out = self.run(f"python3 - {registry} {repository} {src} {dst}", input_data=RETAG_PY.encode(),
                           quiet=True)
        if rc != 0:
            raise RuntimeError(f"tagging {repository}:{src} as {dst} failed: {out}")
        return out.strip()

    COLLECT: ClassVar[dict[str, str]] = {
        "systemctl-show.txt": "systemctl show nvidia-agent",
        "systemctl-status.txt": "systemctl status --no-pager -l nvidia-agent docker-registry fake-gpu",
        "journal.txt": "journalctl -u nvidia-agent -b --no-pager",
        "status.json": "nvidia-agent status --json",
        "status.txt": "nvidia-agent status",
        "proc-modules.txt": "cat /proc/modules",
        "dev-nvidia.txt": "ls -l /dev/nvidia*",
        "mountinfo.txt": "cat /proc/self/mountinfo",
        # the agent's own view: differs from the host's if the unit gets a private mount namespace
        "agent-mountinfo.txt": "p=$(systemctl show -P MainPID nvidia-agent); echo pid $p; "
                               "grep -E 'overlay|lib64' /proc/$p/mountinfo; readlink /proc/$p/ns/mnt /proc/1/ns/mnt",
        "proc-devices.txt": "cat /proc/devices",
        "opt-nvidia.txt": "ls -la /opt/nvidia /opt/nvidia/*/ 2>&1; readlink /opt/nvidia/current",
        "dmesg.txt": "dmesg | tail -200",
        "standins.txt": "tail -n 5 /var/log/*.seen; systemctl show -p Id -p ActiveState -p StatusText"
                        " -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic -p After"
                        " -p DropInPaths nvidia-agent "
                        + " ".join(f"{u}.service" for u in STANDINS),
        "journal-boot.txt": "journalctl -b --no-pager | tail -400",
    }

    def collect(self, dest: Path) -> Path:
        """Bring back what an operator would look at."""
        dest.mkdir(parents=True, exist_ok=True)
        for name, cmd in self.COLLECT.items():
            try:
                rc, out = self.run(cmd, quiet=True, timeout=60)
                (dest / name).write_text(f"$ {cmd}  (rc={rc})\n{out}")
            except Exception as exc:  # a dead guest still leaves the console logs
                (dest / name).write_text(f"$ {cmd}\nnot collected: {exc}\n")
        for p in self.dir.glob("console-*.log"):
            shutil.copy(p, dest / p.name)
        return dest


RETAG_PY = """\
import sys, urllib.request
registry, repo, src, dst = sys.argv[1:5]
types = ["application/vnd.oci.image.index.v1+json", "application/vnd.oci.image.manifest.v1+json",
         "application/vnd.docker.distribution.manifest.list.v2+json",
         "application/vnd.docker.distribution.manifest.v2+json"]
base = f"http://{registry}/v2/{repo}/manifests/"
with urllib.request.urlopen(urllib.request.Request(base + src, headers={"Accept": ", ".join(types)})) as r:
    body, media_type = r.read(), r.headers["Content-Type"]
put = urllib.request.Request(base + dst, data=body, method="PUT", headers={"Content-Type": media_type})
with urllib.request.urlopen(put) as r:
    print(r.headers.get("Docker-Content-Digest"))
"""

_RUNNING: set[subprocess.Popen[bytes]] = set()


@atexit.register
def _kill_leftover_guests() -> None:
    """Never leave a guest running behind a dead test run (only ours, by PID)."""
    for proc in _RUNNING:
        if proc.poll() is None:
            _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """Kill `timeout` and the qemu under it: killing `timeout --foreground` alone leaves qemu running."""
    for children in Path(f"/proc/{proc.pid}/task").glob("*/children"):
        with contextlib.suppress(OSError, ValueError):
            for child in children.read_text().split():
                os.kill(int(child), signal.SIGKILL)
    proc.kill()
    proc.wait()


def _mk(p: Path) -> bool:
    p.mkdir(parents=True, exist_ok=True)
    return True


def print_timings(out: Any = sys.stderr) -> None:
    print("\n== VM timings ==", file=out)
    for label, s in TIMINGS:
        print(f"  {s:7.1f}s  {label}", file=out)


# --------------------------------------------------------------------------- CLI

DEMO_COMMANDS = (
    "systemctl show -p ActiveState -p StatusText -p ActiveEnterTimestampMonotonic nvidia-agent",
    "nvidia-agent status",
    "journalctl -u nvidia-agent -b --no-pager -o cat",
    "ls -l /dev/nvidia* /opt/nvidia",
    "grep nvidia /proc/modules",
    "grep ' /usr/lib64 ' /proc/self/mountinfo",
    "nvidia-smi",
    "systemctl cat kubelet.service | tail -4",
)
# what makes the CoreOS-like guest what it is, shown before the agent's side
COREOS_DEMO_COMMANDS = (
    "command -v python3 || echo 'no python3 on this host'",
    "findmnt -n -o TARGET,FSTYPE,OPTIONS /usr",
    "systemd-sysext status",
    "ls -l /etc/extensions /opt/extensions/nvidia-agent",
    "readlink -f /proc/$(systemctl show -P MainPID nvidia-agent)/exe",
)


def demo(kernel: str, variant: str = "fcos") -> int:
    """Boot the guest; the agent (a systemd service) pulls, installs, loads; print what an operator sees."""
    build_image(variant=variant)
    with Guest(kernel=kernel, name="demo", variant=variant) as g:
        g.wait_agent_active()
        failed = 0
        commands = (COREOS_DEMO_COMMANDS if variant != "debian" else ()) + DEMO_COMMANDS
        for cmd in commands:
            rc, out = g.run(cmd, timeout=120, quiet=True)
            print(f"\n$ {cmd}\n{out.rstrip()}" + (f"\n[exit {rc}]" if rc else ""))
            failed += cmd in ("nvidia-agent status", "nvidia-smi") and rc != 0
    print_timings()
    return 1 if failed else 0


VARIANT_HELP = ("debian: the agent from a venv (README's plain-distribution recipe); fcos, flatcar: a CoreOS-like "
                "host (no python3, /usr read-only) with the agent only as the system extension, placed by "
                "packaging/deploy/<variant>.ign")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.vm.harness", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup", help="build or reuse the cached guest image")
    s.add_argument("--force", action="store_true", help="rebuild the final image even on a cache hit")
    s.add_argument("--variant", choices=VARIANTS, default="debian", help=VARIANT_HELP)
    r = sub.add_parser("run", help="run scenarios (test names of tests/vm/test_vm*.py, without test_)")
    r.add_argument("scenarios", nargs="*")
    r.add_argument("pytest_args", nargs=argparse.REMAINDER)
    d = sub.add_parser("demo", help="the agent's main job on a VM host: boot, let the agent install and load the "
                                    "driver from the guest's own registry, show what an operator sees, power off")
    d.add_argument("--kernel", default="amd64", help="amd64 (default), cloud, or an exact release")
    d.add_argument("--variant", choices=VARIANTS, default="fcos", help=VARIANT_HELP + " (default: fcos)")
    h = sub.add_parser("shell", help="boot a guest on a fresh disk and run commands typed on stdin")
    h.add_argument("--kernel", default="amd64", help="amd64 (default), cloud, or an exact release")
    h.add_argument("--variant", choices=VARIANTS, default="debian", help=VARIANT_HELP)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("the VM harness needs root (debootstrap, chroot, mkfs)", file=sys.stderr)
        return 1
    if a.cmd == "setup":
        build_image(force=a.force, variant=a.variant)
        print_timings()
        return 0
    if a.cmd == "run":
        py = REPO / ".venv/bin/python"
        cmd = [str(py) if py.exists() else sys.executable, "-m", "pytest", "-m", "vm", "-s",
               str(HERE / "test_vm.py"), str(HERE / "test_vm_sysext.py")]
        if a.scenarios:
            cmd += ["-k", " or ".join(a.scenarios)]
        return subprocess.run(cmd + a.pytest_args, cwd=REPO, check=False).returncode
    if a.cmd == "demo":
        return demo(a.kernel, a.variant)
    build_image(variant=a.variant)
    with Guest(kernel=a.kernel, name="shell", variant=a.variant) as g:
        print(f"guest up ({g.kernel}); workdir {g.dir}; type commands, EOF or 'exit' to power off",
              file=sys.stderr)
        for line in sys.stdin:
            if line.strip() in ("exit", "quit"):
                break
            if line.strip():
                rc, out = g.run(line.strip(), timeout=600)
                print(out, end="" if out.endswith("\n") or not out else "\n")
                print(f"[rc={rc}]", file=sys.stderr)
    print_timings()
    return 0


if __name__ == "__main__":
    sys.exit(main())
