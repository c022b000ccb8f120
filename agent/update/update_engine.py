"""Flatcar's update_engine: what it says about the next boot (pure; the bus client is elsewhere).

Interface (flatcar/update_engine, src/update_engine/update_engine.xml and dbus_constants.h): bus name
`com.coreos.update1`, object `/com/coreos/update1`, interface `com.coreos.update1.Manager`;
`GetStatus() -> (x last_checked_time, d progress, s current_operation, s new_version, x new_size)` and
the signal `StatusUpdate` with the same five values. `update_engine_client -status` prints the same
five as KEY=VALUE lines. Once the new OS is written to the other USR partition the operation is
`UPDATE_STATUS_UPDATED_NEED_REBOOT` and `new_version` is the OS version the next boot runs.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

BUS_NAME = "com.coreos.update1"
OBJECT_PATH = "/com/coreos/update1"
INTERFACE = "com.coreos.update1.Manager"
SIGNAL = "StatusUpdate"

# update_attempter.cc, UpdateStatusToString: every value the field can hold.
OPERATIONS = (
    "UPDATE_STATUS_IDLE",
    "UPDATE_STATUS_CHECKING_FOR_UPDATE",
    "UPDATE_STATUS_UPDATE_AVAILABLE",
    "UPDATE_STATUS_DOWNLOADING",
    "UPDATE_STATUS_VERIFYING",
    "UPDATE_STATUS_FINALIZING",
    "UPDATE_STATUS_UPDATED_NEED_REBOOT",
    "UPDATE_STATUS_REPORTING_ERROR_EVENT",
)
NEED_REBOOT = "UPDATE_STATUS_UPDATED_NEED_REBOOT"
# What update_engine reports as the new version when it has none (0.0.0.0 before update_engine#137).
NO_VERSION = frozenset({"", "0.0.0", "0.0.0.0"})  # noqa: S104 - versions, not addresses
VERSION = re.compile(r"[0-9][0-9A-Za-z._+~-]{0,63}")
_CLIENT_KEYS = ("LAST_CHECKED_TIME", "PROGRESS", "CURRENT_OP", "NEW_VERSION", "NEW_SIZE")


class BadStatus(ValueError):
    """update_engine's answer is not one its interface can give."""


@dataclass(frozen=True)
class Status:
    last_checked_time: int
    progress: float
    current_operation: str
    new_version: str
    new_size: int

    @classmethod
    def from_dbus(cls, values: Sequence[object]) -> Status:
        """GetStatus's reply or StatusUpdate's body (signature xdssx), checked field by field."""
        if len(values) != 5:
            raise BadStatus(f"expected 5 values (xdssx), got {len(values)}")
        checked, progress, operation, version, size = values
        if not (isinstance(checked, int) and not isinstance(checked, bool) and isinstance(size, int)
                and not isinstance(size, bool)):
            raise BadStatus(f"last_checked_time and new_size must be integers: {checked!r}, {size!r}")
        if not isinstance(progress, (int, float)) or isinstance(progress, bool) or not 0.0 <= progress <= 1.0:
            raise BadStatus(f"progress must be a number in [0, 1]: {progress!r}")
        if not isinstance(operation, str) or operation not in OPERATIONS:
            raise BadStatus(f"unknown operation {operation!r}")
        if not isinstance(version, str) or not (version in NO_VERSION or VERSION.fullmatch(version)):
            raise BadStatus(f"new_version is not a version: {version!r}")
        return cls(checked, float(progress), operation, version, size)

    @property
    def staged_version(self) -> str | None:
        """The OS version written for the next boot, or None while no update waits for a reboot."""
        if self.current_operation == NEED_REBOOT and self.new_version not in NO_VERSION:
            return self.new_version
        return None


def parse_client_output(text: str) -> Status:
    """`update_engine_client -status` stdout: five KEY=VALUE lines (log lines, on stderr, are skipped).

    The client prints zeros and CURRENT_OP=(null) and still exits 0 when the bus call was refused
    (only root and `core` may call): that is an error here, not an idle updater.
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key in _CLIENT_KEYS:
            fields[key] = value
    missing = [k for k in _CLIENT_KEYS if k not in fields]
    if missing:
        raise BadStatus(f"update_engine_client output lacks {', '.join(missing)}")
    if fields["CURRENT_OP"] == "(null)":
        raise BadStatus("update_engine refused the status call (CURRENT_OP=(null)): run as root")
    try:
        values = (int(fields["LAST_CHECKED_TIME"]), float(fields["PROGRESS"]), fields["CURRENT_OP"],
                  fields["NEW_VERSION"], int(fields["NEW_SIZE"]))
    except ValueError as exc:
        raise BadStatus(f"update_engine_client output: {exc}") from None
    return Status.from_dbus(values)
