"""Writes what fleet tools read, from the status snapshot, after every pass (the I/O of agent.fleet).

    <export.textfile_dir>/nvidia-agent.prom     node_exporter's textfile collector (when the directory exists)
    <export.nfd_dir>/nvidia-agent               NFD local features (when the directory exists; gone with the driver)
    <export.cdi_dir>/nvidia-agent.yaml          the CDI spec of the active tree (gone with the driver)
    <export.operator_dir>/driver-ready,         the GPU operator's markers while the driver works (else gone)
        host-driver-ready

Each is written to a temporary name and renamed (a reader sees the old or the new file, never a
torn one), only when its content changed; a directory set to "" is not written. A failure is a
logged warning (once an hour per file), never a failed pass: the driver works without them.
"""

from __future__ import annotations

import contextlib
import json
import platform
import stat
from pathlib import Path
from typing import Any

import structlog

from agent.fleet import cdi
from agent.fleet.features import HOST_DRIVER_STATUS, NFD_FILE, nfd_features, operator_markers, working
from agent.fleet.metrics import Metrics
from agent.hostroot import HostRoot
from agent.log import RepeatLimiter
from agent.state import write_atomic
from agent.status import Snapshot

log = structlog.get_logger(__name__)
TEXTFILE = "nvidia-agent.prom"
ERROR_LOG_PERIOD_S = 3600.0


class Publisher:
    """The files of the module docstring, for one host root."""

    def __init__(self, host: HostRoot, *, textfile_dir: str, nfd_dir: str, cdi_dir: str, operator_dir: str,
                 library_dir: str, metrics: Metrics) -> None:
        self.host = host
        self.dirs = {"textfile": textfile_dir, "nfd": nfd_dir, "cdi": cdi_dir, "operator": operator_dir}
        # where a container's loader looks without an ld.so.cache entry: RHEL-like images /usr/lib64, Debian-like
        # /usr/lib/<multiarch>; the host's own library directory first
        self.container_lib_dirs = tuple(dict.fromkeys([library_dir, "/usr/lib64", f"/usr/lib/{multiarch()}"]))
        self.metrics = metrics
        self._written: dict[Path, bytes | None] = {}
        self._errors = RepeatLimiter(ERROR_LOG_PERIOD_S)

    def publish(self, snap: Snapshot, *, settled: bool) -> None:
        """Bring the files in line with `snap`; never raises. `settled`: a pass ended with this outcome; else
        only the metrics follow (a phase in the middle of a pass says nothing about whether the driver that
        was loaded before it still works: the spec, markers and labels wait for the outcome)."""
        try:
            self._publish(snap, settled=settled)
        except Exception as exc:  # a bug of ours: the driver works without any of it
            self._warn("export_failed", self.host(self.dirs["cdi"] or "/"), f"{type(exc).__name__}: {exc}")

    def _publish(self, snap: Snapshot, *, settled: bool) -> None:
        self.metrics.observe(snap)
        if self.dirs["textfile"]:
            path = self._dir("textfile") / TEXTFILE
            if path.parent.is_dir():  # else node_exporter is not set up here, and rendering costs an import
                self._put(path, self.metrics.render(), create=False)
        if not settled:
            return
        if self.dirs["nfd"]:
            text = nfd_features(snap)
            self._put(self._dir("nfd") / NFD_FILE, text.encode() if text else None, create=False)
        if self.dirs["operator"]:
            markers = operator_markers(snap)
            for name, ours in (("driver-ready", HOST_DRIVER_STATUS), ("host-driver-ready", "")):
                content = markers.get(name) if markers else None
                self._put(self._dir("operator") / name, content.encode() if content is not None else None,
                          create=True, ours=ours.encode())
        if self.dirs["cdi"]:
            doc = self._cdi(snap)
            self._put(self._dir("cdi") / cdi.SPEC_FILE,
                      (json.dumps(doc, indent=1) + "\n").encode() if doc else None, create=True)

    def _dir(self, kind: str) -> Path:
        """An export directory under the host root, its links resolved there (Debian's /var/run -> /run)."""
        return self.host(self.host.resolve(self.dirs[kind]))

    def _cdi(self, snap: Snapshot) -> dict[str, Any] | None:
        if not working(snap) or snap.current is None or not snap.devices:
            return None  # a spec only for a driver that works now (devices of an earlier pass say nothing)
        tree = self.host(snap.current)
        libraries = [(f"{snap.current}/lib64/{name}", f"{where}/{name}")
                     for name in _files(tree / "lib64") for where in self.container_lib_dirs]
        tools = [(f"{snap.current}/bin/{name}", f"/usr/bin/{name}") for name in _files(tree / "bin")]
        doc = cdi.spec(snap.devices, libraries, tools)
        if doc is None:
            return None
        problems = cdi.validate(doc)
        if problems:  # a bug of ours: a runtime would refuse the whole file
            self._warn("cdi_spec_invalid", self.host(self.dirs["cdi"]), "; ".join(problems))
            return None
        return doc

    def _put(self, path: Path, content: bytes | None, *, create: bool, ours: bytes | None = None) -> None:
        """Write `content` at `path`, or remove it for None, unless it is so already. `create`: make the
        directory. A file of a name another tool writes too (`ours`: the content this agent writes there) is
        removed only when it holds that, or what this agent wrote last: the other tool's is left alone."""
        try:
            if content is None:
                shared = ours is not None
                if path.is_file() and (not shared or path.read_bytes() in (ours, self._written.get(path))):
                    path.unlink()
                self._written.pop(path, None)
                return
            if self._written.get(path) == content and path.exists():
                return
            if not path.parent.is_dir():
                if not create:
                    return  # its reader (node_exporter, NFD) is not set up here: written once it is
                path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, content)
        except OSError as exc:
            self._warn("export_not_written", path, exc.strerror or str(exc))
            return
        self._written[path] = content

    def _warn(self, event: str, path: Path, error: str) -> None:
        if self._errors.should_log(f"{event}:{path}")[0]:
            log.warning(event, path=str(path), error=error, hint="the driver works without it; fix the path or "
                        "set it to \"\" in [export]")


def multiarch(machine: str | None = None) -> str:
    """Debian's multiarch tuple of this machine: x86_64-linux-gnu, aarch64-linux-gnu, ..."""
    name = machine or platform.machine()
    return {"x86_64": "x86_64-linux-gnu", "amd64": "x86_64-linux-gnu", "aarch64": "aarch64-linux-gnu",
            "arm64": "aarch64-linux-gnu", "ppc64le": "powerpc64le-linux-gnu"}.get(name, f"{name}-linux-gnu")


def _files(directory: Path) -> list[str]:
    """The names of the regular files (and links to them) directly in `directory`, sorted; none if it is gone."""
    names = []
    with contextlib.suppress(OSError):
        for entry in sorted(directory.iterdir()):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(entry.stat().st_mode) and entry.resolve().is_relative_to(directory.resolve()):
                    names.append(entry.name)
    return names
