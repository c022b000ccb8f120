"""A sandboxed Flatcar host's update, as update_engine leaves it: the OS release, the kernel slots
(/boot/flatcar/vmlinuz-a and -b, whose bzImage headers name their kernel) and driver images per
OS version and kernel."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from support.images import build_image, make_driver_tree
from support.sandbox import DRIVER, FIXTURES, REPO, Host, write

MOCK = "org.freedesktop.DBus.Mock"
OLD, NEW = "3139.2.0", "3139.2.1"
FLATCAR = (FIXTURES / "os-release/flatcar-3139.2.0").read_text()


def bzimage_head(release: str) -> bytes:
    """A kernel image's first bytes as the x86 boot protocol lays them out, naming `release`."""
    head = bytearray(0x1000)
    head[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", head, 0x206, 0x20F)
    struct.pack_into("<H", head, 0x20E, 0x300)
    version = f"{release} (builder@flatcar) #1 SMP PREEMPT_DYNAMIC\0".encode()
    head[0x500:0x500 + len(version)] = version
    return bytes(head)


def flatcar_tree(kernel: str, version: str) -> str:
    return f"/opt/nvidia/{DRIVER}/flatcar-{version}-{kernel}"


def push_flatcar(tmp_path: Path, registry: str, kernel: str, version: str, *, big_lib_bytes: int = 0) -> str:
    """Build and push the driver image for (version, kernel); `big_lib_bytes` adds an incompressible
    library of that size (a download that takes a while through a dripping proxy)."""
    tree = make_driver_tree(tmp_path / f"tree-{kernel}-{version}-{big_lib_bytes}", driver=DRIVER, kernel=kernel)
    if big_lib_bytes:
        write(tree / f"lib64/libnvidia-big.so.{DRIVER}", os.urandom(big_lib_bytes))
    return build_image(tree, f"{registry}/{REPO}:{DRIVER}-flatcar-{version}-{kernel}", driver=DRIVER,
                       os_id="flatcar", os_version=version, kernel=kernel)


def make_flatcar(host: Host, kernel: str) -> Host:
    write(host.root / "etc/os-release", FLATCAR)
    write(host.root / "boot/flatcar/vmlinuz-a", bzimage_head(kernel))
    return host


def update_written(host: Host, kernel: str, slot: str = "b") -> None:
    """update_engine wrote the new OS's kernel into the slot not booted."""
    write(host.root / f"boot/flatcar/vmlinuz-{slot}", bzimage_head(kernel))


def reboot_into(host: Host, kernel: str, version: str, slot: str) -> None:
    host.set_kernel(kernel)
    write(host.root / "etc/os-release", FLATCAR.replace(OLD, version))
    write(host.root / f"boot/flatcar/vmlinuz-{slot}", bzimage_head(kernel))
