"""A CDI spec for the active driver (pure): `nvidia.com/gpu`, one device per GPU and `all`.

Container Device Interface, spec version 0.5.0 (cncf-tags/container-device-interface SPEC.md;
the version Debian 12's podman 4.3 reads): each device's containerEdits carry its device
node; the spec-wide containerEdits carry the control nodes (nvidiactl, nvidia-uvm,
nvidia-uvm-tools, nvidia-modeset) and bind mounts, read-only, of the active tree's libraries
(into the host's library directory path, `mount.target`) and tools (into /usr/bin). The
mounts name the tree itself, not `current`, so a container keeps the files it started with;
the spec is rewritten on every switch. `validate` checks a spec against the 0.5.0 rules the
runtimes enforce, so nothing malformed is ever written.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath
from typing import Any

CDI_VERSION = "0.5.0"
KIND = "nvidia.com/gpu"
# Not nvidia.yaml: NVIDIA Container Toolkit's nvidia-cdi-refresh writes that name (JSON is YAML: runtimes read
# either from a .yaml file)
SPEC_FILE = "nvidia-agent.yaml"
CONTROL_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "nvidia-modeset")
GPU_NODE_RE = re.compile(r"^/dev/nvidia(\d+)\Z")
MOUNT_OPTIONS = ("ro", "nosuid", "nodev", "bind")
# SPEC.md: kind is vendor/class; device names alphanumerics and _.:- , starting alphanumeric
_VENDOR_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*[A-Za-z0-9]\Z")
_CLASS_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*[A-Za-z0-9]\Z")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*\Z")


def spec(devices: Iterable[str], libraries: Iterable[tuple[str, str]], tools: Iterable[tuple[str, str]],
         ) -> dict[str, Any] | None:
    """The spec for these device nodes (`/dev/nvidia0`, `/dev/nvidiactl`, ...) and files (host path, container
    path); None when there is no GPU node to hand out."""
    nodes = sorted(set(devices))
    gpus = sorted((int(m.group(1)), path) for path in nodes if (m := GPU_NODE_RE.match(path)))
    if not gpus:
        return None
    control = [path for path in (f"/dev/{n}" for n in CONTROL_NODES) if path in nodes]
    mounts = [{"hostPath": host, "containerPath": ctr, "options": list(MOUNT_OPTIONS)}
              for host, ctr in sorted({*libraries, *tools}, key=lambda m: m[1])]
    return {
        "cdiVersion": CDI_VERSION,
        "kind": KIND,
        "devices": [{"name": str(minor), "containerEdits": {"deviceNodes": [{"path": path}]}} for minor, path in gpus]
        + [{"name": "all", "containerEdits": {"deviceNodes": [{"path": path} for _, path in gpus]}}],
        "containerEdits": {"deviceNodes": [{"path": path} for path in control], "mounts": mounts},
    }


def validate(doc: Mapping[str, Any]) -> list[str]:
    """What breaks CDI 0.5.0 in `doc` (empty when nothing does): version, kind, device names (unique),
    absolute device and mount paths, edits of known shape."""
    problems: list[str] = []
    if doc.get("cdiVersion") != CDI_VERSION:
        problems.append(f"cdiVersion {doc.get('cdiVersion')!r} is not {CDI_VERSION}")
    kind = doc.get("kind")
    vendor, _, klass = kind.partition("/") if isinstance(kind, str) else ("", "", "")
    if not (_VENDOR_RE.match(vendor) and _CLASS_RE.match(klass)):
        problems.append(f"kind {kind!r} is not vendor/class")
    devices = doc.get("devices")
    if not isinstance(devices, list) or not devices:
        return [*problems, "no devices"]
    seen: set[str] = set()
    for i, device in enumerate(devices):
        name = device.get("name") if isinstance(device, dict) else None
        if not isinstance(name, str) or not _NAME_RE.match(name):
            problems.append(f"device {i}: name {name!r} is not a CDI device name")
        elif name in seen:
            problems.append(f"device {name}: named twice")
        else:
            seen.add(name)
        edits = device.get("containerEdits") if isinstance(device, dict) else None
        problems += _edits(edits, f"device {name}", need_some=True)
    if "containerEdits" in doc:
        problems += _edits(doc["containerEdits"], "spec", need_some=False)
    return problems


def _edits(edits: Any, where: str, *, need_some: bool) -> list[str]:
    if not isinstance(edits, dict):
        return [f"{where}: containerEdits is not an object"]
    problems = []
    unknown = set(edits) - {"env", "deviceNodes", "hooks", "mounts"}
    if unknown:
        problems.append(f"{where}: unknown containerEdits {sorted(unknown)}")
    nodes, mounts = edits.get("deviceNodes", []), edits.get("mounts", [])
    if need_some and not nodes and not mounts and not edits.get("env") and not edits.get("hooks"):
        problems.append(f"{where}: no edits")
    for node in nodes if isinstance(nodes, list) else [None]:
        path = node.get("path") if isinstance(node, dict) else None
        if not isinstance(path, str) or not PurePosixPath(path).is_absolute():
            problems.append(f"{where}: device node {path!r} is not an absolute path")
    for mount in mounts if isinstance(mounts, list) else [None]:
        paths = [mount.get(k) for k in ("hostPath", "containerPath")] if isinstance(mount, dict) else [None]
        if not all(isinstance(p, str) and PurePosixPath(p).is_absolute() for p in paths):
            problems.append(f"{where}: mount {mount!r} needs absolute hostPath and containerPath")
    return problems
