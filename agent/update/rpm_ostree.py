"""rpm-ostree (Fedora and RHEL CoreOS): the staged deployment the next boot runs (pure).

Interface (coreos/rpm-ostree, src/daemon/org.projectatomic.rpmostree1.xml): bus name
`org.projectatomic.rpmostree1`, object `/org/projectatomic/rpmostree1/Sysroot`, interface
`org.projectatomic.rpmostree1.Sysroot`, property `Deployments` (aa{sv}); `rpm-ostree status --json`
prints the same dictionaries under "deployments". After Zincati or an administrator staged an
update, one of them has `"staged": true` (the key may be absent on others: false). Its files are
under /ostree/deploy/<osname>/deploy/<checksum>.<serial>/, its kernel is the directory under
usr/lib/modules/ there that holds a vmlinuz.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

BUS_NAME = "org.projectatomic.rpmostree1"
SYSROOT_PATH = "/org/projectatomic/rpmostree1/Sysroot"
SYSROOT_INTERFACE = "org.projectatomic.rpmostree1.Sysroot"

_OSNAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_CHECKSUM = re.compile(r"[0-9a-f]{64}")
_VERSION = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+~-]{0,63}")
_RELEASE = re.compile(r"[0-9]+\.[0-9]+[A-Za-z0-9._+~-]{0,120}")


class BadDeployment(ValueError):
    """A deployment record that rpm-ostree could not have written."""


@dataclass(frozen=True)
class Deployment:
    id: str
    osname: str
    checksum: str
    serial: int
    version: str | None
    staged: bool
    booted: bool

    @property
    def root(self) -> PurePosixPath:
        """Where the deployment's files are, from the host's root."""
        return PurePosixPath("/ostree/deploy", self.osname, "deploy", f"{self.checksum}.{self.serial}")


def _deployment(record: Mapping[str, object]) -> Deployment:
    osname, checksum, serial = record.get("osname"), record.get("checksum"), record.get("serial")
    version, staged, booted = record.get("version"), record.get("staged", False), record.get("booted", False)
    if not isinstance(osname, str) or not _OSNAME.fullmatch(osname):
        raise BadDeployment(f"osname {osname!r}")
    if not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
        raise BadDeployment(f"checksum {checksum!r} is not a sha256")
    if not isinstance(serial, int) or isinstance(serial, bool) or not 0 <= serial < 1 << 31:
        raise BadDeployment(f"serial {serial!r}")
    if version is not None and (not isinstance(version, str) or not _VERSION.fullmatch(version)):
        raise BadDeployment(f"version {version!r}")
    if not isinstance(staged, bool) or not isinstance(booted, bool):
        raise BadDeployment(f"staged/booted must be booleans: {staged!r}, {booted!r}")
    ident = record.get("id")
    return Deployment(id=ident if isinstance(ident, str) else f"{osname}-{checksum}.{serial}", osname=osname,
                      checksum=checksum, serial=serial, version=version, staged=staged, booted=booted)


def next_deployment(records: Sequence[Mapping[str, object]]) -> Deployment | None:
    """The deployment the next boot runs when it is not the booted one, from the raw records
    (Sysroot.Deployments, or status --json's "deployments", in boot order): the staged one (written
    at shutdown), else the first (the default: a pending deployment, or a rollback). Only that
    record is checked; an odd record elsewhere (an old rollback's label) does not stop detection."""
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise BadDeployment("deployments must be a list")
    if not all(isinstance(r, Mapping) for r in records):
        raise BadDeployment("every deployment must be a dictionary")
    flagged = [r for r in records if r.get("staged") is True]
    if len(flagged) > 1:
        raise BadDeployment(f"{len(flagged)} staged deployments: rpm-ostree stages one at most")
    chosen = flagged[0] if flagged else (records[0] if records else None)
    if chosen is None:
        return None
    deployment = _deployment(chosen)
    return None if deployment.booted else deployment


def kernel_release(module_dirs: Mapping[str, bool]) -> str:
    """The kernel of a deployment: of the entries under its usr/lib/modules/ (name -> has a vmlinuz),
    the one with a vmlinuz (an ostree deployment ships exactly one kernel)."""
    kernels = sorted(name for name, has_vmlinuz in module_dirs.items() if has_vmlinuz)
    if len(kernels) != 1:
        raise BadDeployment(f"expected one kernel (a usr/lib/modules/<release>/vmlinuz), found {kernels or 'none'}")
    if not _RELEASE.fullmatch(kernels[0]):
        raise BadDeployment(f"{kernels[0]!r} is not a kernel release")
    return kernels[0]
