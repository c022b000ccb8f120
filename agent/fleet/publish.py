"""Writes what fleet tools read, from the status snapshot, after every pass (the I/O of agent.fleet).

    <export.textfile_dir>/nvidia-agent.prom     node_exporter's textfile collector (when the directory exists)
    <export.nfd_dir>/nvidia-agent               NFD local features (when the directory exists; gone with the driver)
    <export.cdi_dir>/nvidia.yaml                the CDI spec of the active tree (gone with the driver)
    <export.operator_dir>/driver-ready,         the GPU operator's markers while the driver works (else gone)
        host-driver-ready

Each is written to a temporary name and renamed (a reader sees the old or the new file, never a
torn one), only when its content changed; a directory set to "" is not written. A failure is a
logged warning (once an hour per file), never a failed pass: the driver works without them.
"""

from __future__ import annotations

import contextlib
import json
import stat
from pathlib import Path
from typing import Any

import structlog

from agent.fleet import cdi
from agent.fleet.features import NFD_FILE, nfd_features, operator_markers, working
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
        self.library_dir = library_dir
        self.metrics = metrics
        self._written: dict[Path, bytes | None] = {}
        self._errors = RepeatLimiter(ERROR_LOG_PERIOD_S)

    def publish(self, snap: Snapshot) -> None:
        """Bring every file in line with `snap`; never raises."""
        self.metrics.observe(snap)
        if self.dirs["textfile"]:
            self._put(self.host(self.dirs["textfile"]) / TEXTFILE, self.metrics.render(), create=False)
        if self.dirs["nfd"]:
            text = nfd_features(snap)
            self._put(self.host(self.dirs["nfd"]) / NFD_FILE, text.encode() if text else None, create=False)
        if self.dirs["operator"]:
            markers = operator_markers(snap)
            for name in ("driver-ready", "host-driver-ready"):
                content = markers.get(name) if markers else None
                self._put(self.host(self.dirs["operator"]) / name,
                          content.encode() if content is not None else None, create=True)
        if self.dirs["cdi"]:
            doc = self._cdi(snap)
            self._put(self.host(self.dirs["cdi"]) / cdi.SPEC_FILE,
                      (json.dumps(doc, indent=1) + "\n").encode() if doc else None, create=True)

    def _cdi(self, snap: Snapshot) -> dict[str, Any] | None:
        if not working(snap) or snap.current is None or not snap.devices:
            return None  # a spec only for a driver that works now (devices of an earlier pass say nothing)
        tree = self.host(snap.current)
        libraries = [(f"{snap.current}/lib64/{name}", f"{self.library_dir}/{name}")
                     for name in _files(tree / "lib64")]
        tools = [(f"{snap.current}/bin/{name}", f"/usr/bin/{name}") for name in _files(tree / "bin")]
        doc = cdi.spec(snap.devices, libraries, tools)
        if doc is None:
            return None
        problems = cdi.validate(doc)
        if problems:  # a bug of ours: a runtime would refuse the whole file
            self._warn("cdi_spec_invalid", self.host(self.dirs["cdi"]), "; ".join(problems))
            return None
        return doc

    def _put(self, path: Path, content: bytes | None, *, create: bool) -> None:
        """Write `content` at `path` (remove it for None) unless it is already so. `create`: make the directory."""
        if self._written.get(path, b"\0unknown") == content and (content is None) != path.exists():
            return
        try:
            if content is None:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
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


def _files(directory: Path) -> list[str]:
    """The names of the regular files (and links to them) directly in `directory`, sorted; none if it is gone."""
    names = []
    with contextlib.suppress(OSError):
        for entry in sorted(directory.iterdir()):
            with contextlib.suppress(OSError):
                if stat.S_ISREG(entry.stat().st_mode) and entry.resolve().is_relative_to(directory.resolve()):
                    names.append(entry.name)
    return names
