"""The reboot gate's decisions (pure): FleetLock requests checked, and whether a reboot may go now.

FleetLock (coreos/zincati docs/development/fleetlock/protocol.md): a client POSTs
`{"client_params": {"id": ..., "group": ...}}` with the header `fleet-lock-protocol: true` to
`<base>/v1/pre-reboot` (take a reboot slot) or `<base>/v1/steady-state` (release it). 200 grants;
any other status refuses, with `{"kind": ..., "value": ...}` (kind of small cardinality).

The agent's gate sits between the client and the fleet's lock server (if any): it grants a
pre-reboot only when the next boot's driver is staged, so the node never reboots into an OS
it has no driver for; after `update.hold_max_s` of refusing the same next boot it grants with
a warning, so a missing image delays reboots, never blocks them for ever.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

PRE_REBOOT = "/v1/pre-reboot"
STEADY_STATE = "/v1/steady-state"
OPERATIONS = {PRE_REBOOT: "pre-reboot", STEADY_STATE: "steady-state"}
PROTOCOL_HEADER = "fleet-lock-protocol"
GROUP_RE = re.compile(r"^[a-zA-Z0-9.-]+\Z")  # the spec's client group (\Z: no newline after it)
MAX_BODY_BYTES = 4096
MAX_ID_CHARS = 256


@dataclass(frozen=True)
class Rejection:
    """A refusal as the protocol carries it: an HTTP status and {kind, value}."""

    status: int
    kind: str
    value: str

    def body(self) -> bytes:
        return json.dumps({"kind": self.kind, "value": self.value}).encode()


@dataclass(frozen=True)
class Request:
    operation: str  # "pre-reboot" | "steady-state"
    client_id: str
    group: str
    body: bytes  # forwarded upstream as the client sent it


def parse_request(path: str, protocol_header: str | None, body: bytes) -> Request | Rejection:
    """A POST as it arrived, checked against the protocol; anything else is refused with why."""
    operation = OPERATIONS.get(path.rstrip("/") if path != "/" else path)
    if operation is None:
        return Rejection(404, "unknown_endpoint", f"{path!r}: this FleetLock gate serves "
                         f"{PRE_REBOOT} and {STEADY_STATE}")
    if (protocol_header or "").strip().lower() != "true":
        return Rejection(400, "missing_protocol_header", f"a FleetLock request carries '{PROTOCOL_HEADER}: true'")
    if len(body) > MAX_BODY_BYTES:
        return Rejection(413, "body_too_large", f"a FleetLock body is at most {MAX_BODY_BYTES} bytes")
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return Rejection(400, "invalid_body", "the body is not JSON")
    params = doc.get("client_params") if isinstance(doc, dict) else None
    if not isinstance(params, dict):
        return Rejection(400, "invalid_body", "the body has no client_params object")
    client_id, group = params.get("id"), params.get("group")
    if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_ID_CHARS \
            or not client_id.isprintable():
        return Rejection(400, "invalid_client_id", "client_params.id is a non-empty printable string")
    if not isinstance(group, str) or not GROUP_RE.match(group):
        return Rejection(400, "invalid_group", "client_params.group matches ^[a-zA-Z0-9.-]+$")
    return Request(operation, client_id, group, body)


@dataclass(frozen=True)
class Hold:
    """The next boot the gate has been refusing a reboot for, since when (wall clock, seconds)."""

    os_key: str
    since: float


@dataclass(frozen=True)
class Verdict:
    grant: bool
    reason: str
    hold: Hold | None  # the hold to remember after this request (None: nothing held)
    refusal: Rejection | None = None
    warning: bool = False  # granted although the next boot's driver is not staged


def decide(phase: str, serving: bool, next_boot: dict[str, Any] | None, *, source: str, looked: bool,
           hold: Hold | None, now: float, hold_max_s: float) -> Verdict:
    """Whether a pre-reboot may be granted now (steady-state always is: the gate holds no slot).

    `phase`, `serving`, `next_boot`: the agent's snapshot (mid-pass, `next_boot` is still the last
    pass's word); `source`: who tells the next boot (update.source as resolved); `looked`: a pass
    has asked it since the agent started. A host with no working driver now, or no GPU, gains
    nothing from waiting. The hold is one episode per next boot: it starts at the first refusal,
    is not restarted by a pass that could not tell the next boot ("?"), and once it has run out
    it stays run out (every later request is granted) until the driver is staged or another
    next boot comes.
    """
    if phase == "no-gpu":
        return Verdict(True, "no NVIDIA GPU on this host", None)
    if phase in ("failed", "degraded") and not serving:
        return Verdict(True, f"this boot has no working driver ({phase}): holding the reboot "
                       "protects nothing", hold, warning=True)
    if source == "none":
        return Verdict(True, "no updater is watched here (update.source = none): the next boot is not known",
                       None, warning=True)
    if next_boot is not None and next_boot.get("state") == "ready":
        return Verdict(True, f"the driver for {next_boot.get('os_key')} is staged", None)
    if next_boot is None and looked and source == "kernel-postinst":
        return Verdict(True, "no new kernel was announced: the next boot runs this kernel and its driver", None)
    hold = _held(hold, str(next_boot.get("os_key") or "?") if next_boot else "?", now)
    os_key = hold.os_key
    held_s = now - hold.since
    if held_s >= hold_max_s:
        return Verdict(True, f"held {held_s:.0f}s (update.hold_max_s = {hold_max_s:g}) without the driver for "
                       f"{os_key}: rebooting anyway; the next boot installs it when it can", hold, warning=True)
    state = next_boot.get("state") if next_boot else None
    detail = str(next_boot.get("detail") or "") if next_boot else ""
    if next_boot is None:
        kind, value = "nvidia_next_boot_unknown", "the agent has not seen the staged update yet"
    elif state == "missing":
        kind, value = "nvidia_driver_missing", f"no driver image for {os_key} yet: {detail}"
    elif state == "failed":
        kind, value = "nvidia_driver_failed", f"staging the driver for {os_key} failed: {detail}"
    else:
        kind, value = "nvidia_driver_staging", f"the driver for {os_key} is being staged: {detail}"
    value += f" (held {held_s:.0f}s of {hold_max_s:g}s)"
    return Verdict(False, value, hold, refusal=Rejection(409, kind, value))


def _held(hold: Hold | None, os_key: str, now: float) -> Hold:
    """The hold after a refusal for `os_key` ("?": the next boot could not be told this time)."""
    if hold is None:
        return Hold(os_key, now)
    if os_key in ("?", hold.os_key):
        return hold
    if hold.os_key == "?":  # the same episode, now with its name
        return Hold(os_key, hold.since)
    return Hold(os_key, now)  # another next boot: its own hold
