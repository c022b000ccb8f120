"""Logging: structlog events, one line each; under journald with a syslog priority prefix (<3>..<7>)."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

PRIORITY = {"critical": 2, "exception": 3, "error": 3, "warning": 4, "info": 6, "debug": 7}


def under_journald() -> bool:
    """systemd sets JOURNAL_STREAM when stdout/stderr go to the journal."""
    return bool(os.environ.get("JOURNAL_STREAM"))


def add_priority_prefix(_: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    event_dict["_prefix"] = f"<{PRIORITY.get(method, 6)}>"
    return event_dict


def _render_journal(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    prefix = str(event_dict.pop("_prefix", ""))
    event_dict.pop("timestamp", None)  # journald stamps every line itself
    event_dict.pop("level", None)  # the <N> prefix carries it
    trace = _traceback_lines(event_dict)
    return "\n".join(prefix + line for line in [_logfmt(event_dict), *trace])


def _render_console(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> str:
    event_dict.pop("_prefix", None)
    trace = _traceback_lines(event_dict)
    return "\n".join([_logfmt(event_dict), *trace])


def _traceback_lines(event_dict: MutableMapping[str, Any]) -> list[str]:
    """A crash's traceback (from format_exc_info) as indented lines after the event's own line."""
    text = event_dict.pop("exception", None)
    return ["  " + line for line in str(text).rstrip().splitlines()] if text else []


def _logfmt(event_dict: MutableMapping[str, Any]) -> str:
    event = event_dict.pop("event", "")
    level = event_dict.pop("level", None)
    ts = event_dict.pop("timestamp", None)
    parts = [p for p in (ts, level and f"{level:<7}", str(event)) if p]
    for key, value in event_dict.items():
        text = str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def configure(stream: TextIO | None = None, *, journal: bool | None = None, verbose: bool = False) -> None:
    """Set up structlog once for the process; `journal` defaults to detecting journald."""
    journal = under_journald() if journal is None else journal
    processors: list[Any] = [structlog.contextvars.merge_contextvars, structlog.processors.add_log_level,
                             structlog.processors.format_exc_info]
    if journal:
        processors += [add_priority_prefix, _render_journal]
    else:
        processors += [structlog.processors.TimeStamper(fmt="%H:%M:%S"), _render_console]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


class RepeatLimiter:
    """Log a repeated failure once per period, not on every retry (WALinuxAgent's periodic_operation)."""

    def __init__(self, period_s: float, clock: Any = time.monotonic) -> None:
        self.period_s = period_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def should_log(self, key: str) -> tuple[bool, int]:
        """(log now?, how many identical events were suppressed since the last one logged)."""
        now = self._clock()
        last = self._last.get(key)
        if last is None or now - last[0] >= self.period_s:
            suppressed = last[1] if last else 0
            self._last[key] = (now, 0)
            return True, suppressed
        self._last[key] = (last[0], last[1] + 1)
        return False, last[1] + 1

    def forget(self, key: str | None = None) -> None:
        if key is None:
            self._last.clear()
        else:
            self._last.pop(key, None)
