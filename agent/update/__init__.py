"""update: what the OS updater says about the next boot, so its driver can be staged before the reboot.

Pure models here and in update_engine.py (Flatcar), rpm_ostree.py (Fedora/RHEL CoreOS) and
bzimage.py (the release a kernel image carries); the bus clients and the staging pass use them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from agent.hostfacts import OSInfo, os_key

# A kernel release as `uname -r` prints it and a package names its /lib/modules/<release>: what a
# postinst hook or the socket may name (it becomes a path component and part of an image tag).
KERNEL_RELEASE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,127}\Z")


@dataclass(frozen=True)
class NextBoot:
    """The OS and kernel the next boot runs, and who said so."""

    os: OSInfo
    kernel: str
    source: str  # "update_engine", "rpm-ostree", "kernel-postinst"

    @property
    def os_key(self) -> str:
        return os_key(self.os, self.kernel)


def next_boot(current: OSInfo, kernel: str, source: str, version: str | None = None) -> NextBoot:
    """The next boot's identity: the running OS with the updater's new version (None: the same OS,
    a new kernel only, as a plain distribution's kernel package gives)."""
    return NextBoot(replace(current, version=version) if version else current, kernel, source)


class Ambiguous(ValueError):
    """Which kernel the next boot runs cannot be told from what is on disk."""


def flatcar_next_kernel(running: str, releases: Mapping[str, str]) -> str:
    """The kernel Flatcar boots after an update, from the releases in /boot/flatcar/vmlinuz-a and -b.

    The update writes the kernel of the new OS over the slot not booted. The one whose release
    differs from the running kernel is the next; when both equal it, the new OS keeps the kernel.
    Both different (two updates without a reboot, or a slot rewritten by hand) is not guessed.
    """
    others = sorted({r for r in releases.values() if r != running})
    if not others:
        if running not in releases.values():
            raise Ambiguous("neither vmlinuz-a nor vmlinuz-b could be read")
        return running
    if len(others) == 1 and running in releases.values():
        return others[0]
    raise Ambiguous(f"running {running}, slots hold {dict(sorted(releases.items()))}: not the running kernel "
                    "in either slot")
