"""Registry credentials: read a docker-style config.json into a lookup by registry host."""

from __future__ import annotations

import binascii
import json
from base64 import b64decode
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.errors import ConfigError
from agent.reference import DOCKER_HUB_ALIASES

# Keys of an "auths" entry that carry secrets for features this agent does not implement.
_UNSUPPORTED_ENTRY_KEYS = ("identitytoken", "registrytoken")
_AUTH_FORMAT = 'base64 of "user:password"'


@dataclass(frozen=True)
class Credentials:
    """User names and passwords by registry ("host[:port]"), as found in one file.

    `unsupported_helpers` names what the file asks for that is not implemented
    (credsStore, credHelpers, identity tokens), so the caller can warn once.
    The passwords stay out of repr() and logs.
    """

    auths: Mapping[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    path: Path | None = None
    unsupported_helpers: tuple[str, ...] = ()

    @classmethod
    def load(cls, path: Path) -> Credentials:
        """Read `path`; a missing file means no credentials, a malformed one is a ConfigError."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return cls(path=path)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(str(path), None, f"cannot read: {exc}") from exc
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: Path | None = None) -> Credentials:
        """Parse the text of a docker-style config.json (pure; `path` only names it in errors)."""
        source = str(path) if path is not None else "<credentials>"
        try:
            doc = json.loads(text) if text.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(source, None, f"not valid JSON: {exc}") from exc
        if not isinstance(doc, dict):
            raise ConfigError(source, None, "must be a JSON object", valid='{"auths": {...}}')
        auths, unsupported = parse_auths(doc, source)
        return cls(auths=auths, path=path, unsupported_helpers=tuple(unsupported))

    def lookup(self, registry: str) -> tuple[str, str] | None:
        """The (user, password) for `registry` ("host[:port]", exact but case-insensitive), or None."""
        host = registry.lower()
        if host in DOCKER_HUB_ALIASES:  # docker login writes "https://index.docker.io/v1/" for docker.io
            return next((self.auths[h] for h in ("index.docker.io", "docker.io", "registry-1.docker.io")
                         if h in self.auths), None)
        return self.auths.get(host)

    def describe(self, registry: str) -> str:
        """Where an operator fixes the credentials for `registry`: file and key."""
        where = str(self.path) if self.path is not None else "the file named by image.auth_file"
        return f'"auths" -> "{registry}" in {where} (image.auth_file)'


def parse_auths(doc: Mapping[str, Any], source: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Map the "auths" object of a config.json to {registry: (user, password)}.

    Also returns the unsupported helpers and token entries it found (not an error).
    """
    unsupported: list[str] = []
    store = doc.get("credsStore")
    if store:
        unsupported.append(f"credsStore={store}")
    helpers = doc.get("credHelpers")
    if isinstance(helpers, dict):
        unsupported.extend(f"credHelpers[{host}]" for host in helpers)
    elif helpers is not None:
        raise ConfigError(source, "credHelpers", "must be an object")
    raw = doc.get("auths", {})
    if not isinstance(raw, dict):
        raise ConfigError(source, "auths", "must be an object", valid='{"host:port": {"auth": "..."}}')
    auths: dict[str, tuple[str, str]] = {}
    for key, entry in raw.items():
        where = f"auths.{key}"
        registry = registry_from_key(key)
        if registry is None:
            raise ConfigError(source, where, "not a registry host", valid='"host[:port]" or "https://host[:port]"')
        if not isinstance(entry, dict):
            raise ConfigError(source, where, "must be an object", valid='{"auth": "..."}')
        unsupported.extend(f"{where}.{name}" for name in _UNSUPPORTED_ENTRY_KEYS if entry.get(name))
        pair = parse_entry(entry, source, where)
        if pair is not None:
            auths[registry] = pair
    return auths, unsupported


def parse_entry(entry: Mapping[str, Any], source: str, where: str) -> tuple[str, str] | None:
    """(user, password) from one "auths" entry: "auth" (base64) or "username"/"password".

    None for an entry with neither (docker leaves `{}` behind when a helper holds the secret).
    """
    auth = entry.get("auth")
    if auth:
        if not isinstance(auth, str):
            raise ConfigError(source, f"{where}.auth", "must be a string", valid=_AUTH_FORMAT)
        return decode_auth(auth, source, f"{where}.auth")
    user, password = entry.get("username"), entry.get("password")
    if user is None and password is None:
        return None
    if not isinstance(user, str) or not user or not isinstance(password, str):
        raise ConfigError(source, where, "needs both username and password as strings", valid='"username", "password"')
    return user, password


def decode_auth(value: str, source: str, where: str) -> tuple[str, str]:
    """Decode the "auth" field: base64 of "user:password" (the password may contain ':')."""
    try:
        text = b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError) as exc:
        raise ConfigError(source, where, f"cannot decode: {exc}", valid=_AUTH_FORMAT) from exc
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise ConfigError(source, where, "decodes to no user:password pair", valid=_AUTH_FORMAT)
    return user, password


def registry_from_key(key: str) -> str | None:
    """The "host[:port]" an "auths" key names: "https://host:5000/v2/" -> "host:5000"."""
    text = key.strip()
    if "://" in text:
        parts = urlsplit(text)
        if parts.scheme not in ("http", "https"):
            return None
        text = parts.netloc
    else:
        text = text.split("/", 1)[0]
    if not text or "@" in text or any(c.isspace() for c in text):
        return None
    return text.lower()
