"""The next boot as this host's updater has staged it (I/O): the updater on the bus, the kernel it wrote.

    update.source = "auto"  ->  update_engine on Flatcar, rpm-ostree on Fedora/RHEL CoreOS, and
                                kernel-postinst elsewhere (a kernel package's hook runs `nvidia-agent stage`)

Flatcar: update_engine says UPDATED_NEED_REBOOT and the new version; the new kernel is read from
the bzImage header of the slot it wrote (/boot/flatcar/vmlinuz-a or -b), without mounting the new
/usr partition: the header is the kernel's own statement of its release, where the partition's
module tree would need a mount (and dm-verity) to read. Fedora/RHEL CoreOS: rpm-ostree's staged
deployment gives the version; its kernel is the usr/lib/modules/<release>/ with a vmlinuz in
the deployment's directory.
"""

from __future__ import annotations

import os

from agent.errors import HostError
from agent.hostfacts import HostFacts, OSInfo
from agent.hostroot import HostRoot
from agent.update import Ambiguous, NextBoot, bzimage, flatcar_next_kernel, next_boot, rpm_ostree
from agent.update.bus import UpdaterBus

SOURCES = ("auto", "update_engine", "rpm-ostree", "kernel-postinst", "none")
POLLED_SOURCES = ("update_engine", "rpm-ostree")  # asked every update.poll_s; kernel-postinst is told
FLATCAR_KERNELS = {"a": "/boot/flatcar/vmlinuz-a", "b": "/boot/flatcar/vmlinuz-b"}
OSTREE_STAGED = "/run/ostree/staged-deployment"
OSTREE_DEPLOY = "/ostree/deploy"
RPM_OSTREE_IDS = frozenset({"fedora-coreos", "rhcos", "scos", "rhel-coreos", "centos-coreos"})


def source_for(os_: OSInfo, configured: str) -> str:
    """The updater to ask on this OS ("none": nothing stages a next boot that the agent can see)."""
    if configured != "auto":
        return configured
    if os_.id == "flatcar":
        return "update_engine"
    if os_.id in RPM_OSTREE_IDS:
        return "rpm-ostree"
    return "kernel-postinst"


class NextBootProbe:
    def __init__(self, host: HostRoot, bus: UpdaterBus | None = None) -> None:
        self.host = host
        self.bus = bus or UpdaterBus()
        self._ostree_seen: tuple[tuple[object, ...], NextBoot | None] | None = None

    def next_boot(self, facts: HostFacts, source: str) -> NextBoot | None:
        """What the next boot runs once an update is staged; None while none is. HostError otherwise."""
        if source == "update_engine":
            return self._flatcar(facts)
        if source == "rpm-ostree":
            return self._rpm_ostree(facts)
        return None

    def _flatcar(self, facts: HostFacts) -> NextBoot | None:
        version = self.bus.update_engine_status().staged_version
        if version is None:
            return None
        releases = {}
        for slot, path in FLATCAR_KERNELS.items():
            head = self._head(path)
            if head is None:
                continue
            try:
                releases[slot] = bzimage.kernel_release(head)
            except bzimage.NotABzImage as exc:
                raise HostError(f"{path}: {exc}") from None
        try:
            kernel = flatcar_next_kernel(facts.kernel, releases)
        except Ambiguous as exc:
            raise HostError(f"update_engine staged {version}, but the next kernel is unknown: {exc}") from None
        return next_boot(facts.os, kernel, "update_engine", version=version)

    def _head(self, path: str) -> bytes | None:
        try:
            fd = os.open(self.host(path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise HostError(f"cannot read {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            return f.read(bzimage.HEAD_BYTES)

    def _ostree_fingerprint(self) -> tuple[object, ...]:
        """What changes on disk when a deployment is staged, added or removed: rpm-ostreed (which
        exits when idle) is asked only then, not woken up at every poll."""
        marks: list[object] = []
        for path in [self.host(OSTREE_STAGED), *sorted(self.host(OSTREE_DEPLOY).glob("*/deploy"))]:
            try:
                marks.append((str(path), path.stat().st_mtime_ns))
            except OSError:
                marks.append((str(path), None))
        return tuple(marks)

    def _rpm_ostree(self, facts: HostFacts) -> NextBoot | None:
        mark = self._ostree_fingerprint()
        if self._ostree_seen is not None and self._ostree_seen[0] == mark:
            return self._ostree_seen[1]
        answer = self._ask_rpm_ostree(facts)
        self._ostree_seen = (mark, answer)
        return answer

    def _ask_rpm_ostree(self, facts: HostFacts) -> NextBoot | None:
        staged = self.bus.rpm_ostree_next()
        if staged is None:
            return None
        modules = self.host(str(staged.root / "usr/lib/modules"))
        try:
            entries = {e.name: (e / "vmlinuz").is_file() for e in modules.iterdir() if e.is_dir()}
            kernel = rpm_ostree.kernel_release(entries)
        except OSError as exc:
            raise HostError(f"cannot read {staged.root}/usr/lib/modules: {exc.strerror}") from None
        except rpm_ostree.BadDeployment as exc:
            raise HostError(f"rpm-ostree staged {staged.version}: {exc}") from None
        return next_boot(facts.os, kernel, "rpm-ostree", version=staged.version)
