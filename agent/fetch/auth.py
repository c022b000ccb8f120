"""HTTP authentication and back-off headers of the distribution API (pure): WWW-Authenticate, Retry-After."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime


@dataclass(frozen=True)
class Challenge:
    """One challenge of a WWW-Authenticate header: scheme (lowercase) and its parameters."""

    scheme: str
    params: Mapping[str, str]



_TCHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_QUOTED = r'"(?:[^"\\]|\\.)*"'
_SCHEME = re.compile(rf"\s*({_TCHARS})(?=\s|,|$)")
_AUTH_PARAM = re.compile(rf"\s*({_TCHARS})\s*=\s*({_TCHARS}|{_QUOTED})\s*(?:,|$)")
_TOKEN68 = re.compile(r"\s*[A-Za-z0-9._~+/-]+=*\s*(?:,|$)")


def parse_www_authenticate(header: str) -> list[Challenge]:
    """Parse a WWW-Authenticate header (RFC 9110): one or more challenges with auth-params.

    A token68 credential after a scheme is skipped; a malformed part ends the parse and
    what was understood before it is returned.
    """
    challenges: list[Challenge] = []
    text = header.strip()
    pos = 0
    while pos < len(text):
        if text[pos] in ", \t":
            pos += 1
            continue
        scheme = _SCHEME.match(text, pos)
        if scheme is None:
            break
        pos = scheme.end()
        params: dict[str, str] = {}
        token68 = _TOKEN68.match(text, pos)
        if token68 is not None and _AUTH_PARAM.match(text, pos) is None:
            pos = token68.end()
        while (param := _AUTH_PARAM.match(text, pos)) is not None:
            name, value = param.group(1).lower(), param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params.setdefault(name, value)
            pos = param.end()
        challenges.append(Challenge(scheme.group(1).lower(), params))
    return challenges


def parse_retry_after(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date), None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # str.isdigit alone takes "²", which int() refuses
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now_s)

