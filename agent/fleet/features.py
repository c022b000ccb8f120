"""What fleet tools read from files (pure): Node Feature Discovery's local feature file and the
NVIDIA GPU operator's driver validation markers, each from the status snapshot.

NFD's `local` source reads `name=value` lines from /etc/kubernetes/node-feature-discovery/features.d/
and labels the node `feature.node.kubernetes.io/<name>=<value>` (label values: at most 63
characters of [A-Za-z0-9._-], starting and ending alphanumeric). The GPU operator's validator,
and its device plugin and toolkit waiting on it, read /run/nvidia/validations/: `driver-ready`
(with the validator's own KEY=value lines for a host driver: IS_HOST_DRIVER=true,
NVIDIA_DRIVER_ROOT=/, ...) and `host-driver-ready` (the older plugins' sign of a driver on the
host, driver root /).
"""

from __future__ import annotations

import re

from agent.status import Phase, Snapshot

LABEL_VALUE_RE = re.compile(r"^(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?\Z")
NFD_FILE = "nvidia-agent"
DRIVER_READY = "driver-ready"
HOST_DRIVER_READY = "host-driver-ready"
# What gpu-operator's validator writes for a host driver (cmd/nvidia-validator, Driver.createStatusFile)
HOST_DRIVER_STATUS = ("IS_HOST_DRIVER=true\nNVIDIA_DRIVER_ROOT=/\nDRIVER_ROOT_CTR_PATH=/host\nNVIDIA_DEV_ROOT=/\n"
                      "DEV_ROOT_CTR_PATH=/host\n")


def working(snap: Snapshot) -> bool:
    """A driver works on this host now: ready, or degraded but still serving a working tree."""
    return snap.phase is Phase.READY or (snap.serving is not None and snap.phase is Phase.DEGRADED)


def label_value(text: str) -> str:
    """`text` as a label value: other characters become '_', cut to 63, trimmed to alphanumeric ends."""
    value = re.sub(r"[^A-Za-z0-9._-]", "_", text)[:63].strip("._-")
    return value if LABEL_VALUE_RE.match(value) else ""


def nfd_features(snap: Snapshot) -> str | None:
    """The feature file's text, or None when no driver is active (the file goes, and the labels with it)."""
    if snap.phase is Phase.NO_GPU or snap.current is None or snap.active_driver is None:
        return None
    next_state = (snap.next_boot or {}).get("state")
    lines = {
        "nvidia-agent.driver-version": label_value(snap.active_driver),  # what runs, a fallback's too
        "nvidia-agent.ready": "true" if working(snap) else "false",
        "nvidia-agent.kernel": label_value(snap.kernel or ""),
        # no update staged counts as ready: the next boot runs this driver
        "nvidia-agent.next-boot-ready": "true" if next_state in (None, "ready") else "false",
    }
    return "".join(f"{name}={value}\n" for name, value in lines.items() if value)


def operator_markers(snap: Snapshot) -> dict[str, str] | None:
    """The GPU operator's markers and their content while the driver works, else None (they go)."""
    if not working(snap):
        return None
    return {DRIVER_READY: HOST_DRIVER_STATUS, HOST_DRIVER_READY: ""}
