"""Registry credentials: a docker-style config.json, read into a lookup by registry host.

As docker does (docker/cli configfile.GetCredentialsStore): a registry named in "credHelpers"
asks that helper, else "credsStore" names the helper for every registry, else "auths" holds the
secret itself. A helper is the program `docker-credential-<name>`, run as `get` with the server
(`https://index.docker.io/v1/` for docker.io, else the host) on stdin, answering
{"ServerURL", "Username", "Secret"} (docker-credential-helpers' protocol); "<token>" as the user
means the secret is an identity token, exchanged at the registry's token realm. What a helper
says is kept HELPER_CACHE_S at most and dropped when the registry refuses it, so short-lived
tokens (a cloud registry's 12-hour password) are read again when they expire.
"""

from __future__ import annotations

import binascii
import json
import re
import shutil
import time
from base64 import b64decode
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import structlog

from agent import subp
from agent.errors import ConfigError, RegistryError
from agent.reference import DOCKER_HUB_ALIASES

# Keys of an "auths" entry that carry secrets for features this agent does not implement.
_UNSUPPORTED_ENTRY_KEYS = ("registrytoken",)
IDENTITY_TOKEN_USER = "<token>"  # noqa: S105 - a marker: the secret is an identity (refresh) token
log = structlog.get_logger(__name__)
HELPER_CACHE_S = 300.0
HELPER_TIMEOUT_S = 30.0
HELPER_OUTPUT_MAX_BYTES = 64 * 1024
HELPER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
Helper = Callable[[str, str], tuple[int, str, str]]  # (program, stdin) -> (exit status, stdout, stderr)


def run_helper(program: str, server: str) -> tuple[int, str, str]:
    """`program get` with `server` on stdin, as docker runs a credential helper."""
    if shutil.which(program) is None:
        return 127, "", f"{program}: not found on PATH"
    try:
        done = subp.run([program, "get"], input_text=server, check=False, timeout_s=HELPER_TIMEOUT_S)
    except subp.SubpError as exc:  # a timeout, or it could not be started
        return 124, "", str(exc)
    return done.returncode, done.stdout, done.stderr


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
    helpers: Mapping[str, str] = field(default_factory=dict)  # credHelpers: registry -> helper name
    store: str = ""  # credsStore: the helper for every other registry
    run: Helper = field(default=run_helper, repr=False, compare=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    _cache: dict[str, tuple[float, tuple[str, str] | None]] = field(default_factory=dict, repr=False,
                                                                   compare=False)

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
        helpers, store = parse_helpers(doc, source)
        return cls(auths=auths, path=path, unsupported_helpers=tuple(unsupported), helpers=helpers, store=store)

    def helper_for(self, registry: str) -> str:
        """The helper that holds `registry`'s secret ("" for none: the "auths" entry)."""
        host = registry.lower()
        hub = host in DOCKER_HUB_ALIASES
        for key, name in self.helpers.items():
            if key == host or (hub and key in ("index.docker.io", "docker.io", "registry-1.docker.io")):
                return name
        return self.store

    def forget(self, registry: str) -> None:
        """The registry refused what a helper said: ask the helper again next time."""
        self._cache.pop(registry.lower(), None)

    def lookup(self, registry: str) -> tuple[str, str] | None:
        """The (user, password) for `registry` ("host[:port]", exact but case-insensitive), or None;
        ("<token>", identity token) from a helper that holds one. A helper that fails is an error."""
        helper = self.helper_for(registry)
        if helper:
            return self._from_helper(helper, registry.lower())
        host = registry.lower()
        if host in DOCKER_HUB_ALIASES:  # docker login writes "https://index.docker.io/v1/" for docker.io
            return next((self.auths[h] for h in ("index.docker.io", "docker.io", "registry-1.docker.io")
                         if h in self.auths), None)
        return self.auths.get(host)

    def _from_helper(self, helper: str, host: str) -> tuple[str, str] | None:
        cached = self._cache.get(host)
        if cached is not None and self.clock() - cached[0] < HELPER_CACHE_S:
            return cached[1]
        program = f"docker-credential-{helper}"
        server = DOCKER_HUB_SERVER if host in DOCKER_HUB_ALIASES else host
        status, out, err = self.run(program, server)
        if status == 127:  # not installed (docker fails every pull then; a missing helper is no secret to use)
            log.warning("credential_helper_missing", helper=program, registry=host, error=err.strip()[:200])
            self._cache[host] = (self.clock(), None)
            return None
        if status != 0:
            if "credentials not found" in (out + err).lower():
                self._cache[host] = (self.clock(), None)
                return None
            raise RegistryError(f"{program} get {server}: exit {status}: {(err or out).strip()[:300]}",
                                hint=f"check that {program} is on the PATH and logged in (docker login {host})")
        pair = parse_helper_output(out, program)
        self._cache[host] = (self.clock(), pair)
        return pair

    def describe(self, registry: str) -> str:
        """Where an operator fixes the credentials for `registry`: file and key."""
        helper = self.helper_for(registry)
        if helper:
            return f"docker-credential-{helper} (named by {self.path or 'image.auth_file'}; docker login {registry})"
        where = str(self.path) if self.path is not None else "the file named by image.auth_file"
        return f'"auths" -> "{registry}" in {where} (image.auth_file)'


def parse_helpers(doc: Mapping[str, Any], source: str) -> tuple[dict[str, str], str]:
    """credHelpers ({registry: helper}) and credsStore (a helper), names checked: each becomes a program name."""
    valid = "a helper name such as \"ecr-login\" (the program docker-credential-<name>)"
    store = doc.get("credsStore", "")
    if not isinstance(store, str) or (store and not HELPER_NAME_RE.match(store)):
        raise ConfigError(source, "credsStore", f"{store!r} is not a helper name", valid)
    raw = doc.get("credHelpers", {})
    if not isinstance(raw, dict):
        raise ConfigError(source, "credHelpers", "must be an object", '{"registry host": "helper name"}')
    helpers: dict[str, str] = {}
    for key, name in raw.items():
        registry = registry_from_key(key)
        if registry is None or not isinstance(name, str) or not HELPER_NAME_RE.match(name):
            raise ConfigError(source, f"credHelpers.{key}", f"{name!r} is not a helper name", valid)
        helpers[registry] = name
    return helpers, store


def parse_helper_output(out: str, program: str) -> tuple[str, str]:
    """A helper's answer: {"Username", "Secret"} -> (user, secret); anything else is an error."""
    hint = f'try `echo REGISTRY | {program} get`: it must print {{"Username": ..., "Secret": ...}}'
    if len(out) > HELPER_OUTPUT_MAX_BYTES:
        raise RegistryError(f"{program}: more than {HELPER_OUTPUT_MAX_BYTES} bytes of output", hint=hint)
    try:
        doc = json.loads(out)
    except (ValueError, RecursionError):
        raise RegistryError(f"{program}: its answer is not JSON", hint=hint) from None
    user, secret = (doc.get("Username"), doc.get("Secret")) if isinstance(doc, dict) else (None, None)
    if not isinstance(user, str) or not isinstance(secret, str) or not user or not secret:
        raise RegistryError(f"{program}: its answer has no Username and Secret strings", hint=hint)
    return user, secret


def parse_auths(doc: Mapping[str, Any], source: str) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Map the "auths" object of a config.json to {registry: (user, password)}; an "identitytoken"
    becomes ("<token>", token), as docker uses it.

    Also returns the unsupported token entries it found (not an error).
    """
    unsupported: list[str] = []
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
    token = entry.get("identitytoken")
    if token:
        if not isinstance(token, str):
            raise ConfigError(source, f"{where}.identitytoken", "must be a string")
        return IDENTITY_TOKEN_USER, token
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
