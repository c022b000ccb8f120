"""Image references: parsing `registry/repository:tag@digest` and rendering the tag template."""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

# From the OCI distribution spec: repository path components and tags.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
REPOSITORY_RE = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}\Z")
DIGEST_RE = re.compile(r"^sha256:[a-f0-9]{64}\Z")
REGISTRY_RE = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?\Z")

TEMPLATE_FIELDS = frozenset({"driver", "os", "os_id", "os_version", "kernel", "arch"})


@dataclass(frozen=True)
class Reference:
    """A fully qualified image reference. `tag` or `digest` (or both) is set."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    def __post_init__(self) -> None:
        if not REGISTRY_RE.match(self.registry):
            raise ValueError(f"invalid registry host {self.registry!r}")
        if not REPOSITORY_RE.match(self.repository):
            raise ValueError(f"invalid repository {self.repository!r}")
        if self.tag is not None and not TAG_RE.match(self.tag):
            raise ValueError(f"invalid tag {self.tag!r}")
        if self.digest is not None and not DIGEST_RE.match(self.digest):
            raise ValueError(f"invalid digest {self.digest!r} (want sha256:<64 hex>)")
        if self.tag is None and self.digest is None:
            raise ValueError("a reference needs a tag or a digest")

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def selector(self) -> str:
        """What to ask the registry's manifest endpoint for: the digest if pinned, else the tag."""
        return self.digest or self.tag or ""

    def with_digest(self, digest: str) -> Reference:
        return Reference(self.registry, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text

    @classmethod
    def parse(cls, text: str) -> Reference:
        """Parse `host[:port]/repo/path[:tag][@sha256:...]`. The registry host is required."""
        rest, _, digest = text.partition("@")
        host, slash, path = rest.partition("/")
        if not slash or not ("." in host or ":" in host or host == "localhost"):
            raise ValueError(f"{text!r}: a reference must start with a registry host (host[:port]/...)")
        tag = None
        last = path.rsplit("/", 1)[-1]
        if ":" in last:
            path, _, tag = path.rpartition(":")
        return cls(host, path, tag or None, digest or None)


DOCKER_HUB = "docker.io"
DOCKER_HUB_ENDPOINT = "registry-1.docker.io"  # where docker talks the distribution API for docker.io
DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


def normalize(text: str) -> Reference:
    """A reference as docker reads it: `ubuntu` is docker.io/library/ubuntu:latest, `nvidia/driver:x`
    is docker.io/nvidia/driver:x; a first component with a dot or a port, or `localhost`, is a
    registry host (as in distribution's reference.ParseNormalizedNamed)."""
    rest, _, digest = text.partition("@")
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        host, path = first, remainder
    else:
        host, path = DOCKER_HUB, rest
    if host in DOCKER_HUB_ALIASES:
        host = DOCKER_HUB
    tag = None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        path, _, tag = path.rpartition(":")
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not tag and not digest:
        tag = "latest"
    return Reference(host, path, tag or None, digest or None)


def endpoint(registry: str) -> str:
    """The host that serves a registry's API: docker.io's is registry-1.docker.io."""
    return DOCKER_HUB_ENDPOINT if registry in DOCKER_HUB_ALIASES else registry


def sanitize_tag_part(value: str) -> str:
    """Map a value into tag characters: anything outside [A-Za-z0-9_.-] becomes '_'."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", value)


def render_tag(template: str, fields: dict[str, str]) -> str:
    """Render the tag template, e.g. "{driver}-{os}" -> "535.261.03-flatcar-3815.2.0".

    Each field value is sanitized to tag characters; the result must be a valid tag.
    """
    unknown = template_fields(template) - TEMPLATE_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)} in tag template {template!r}")
    tag = template.format_map({k: sanitize_tag_part(v) for k, v in fields.items()})
    if not TAG_RE.match(tag):
        raise ValueError(f"tag template {template!r} renders {tag!r}, which is not a valid tag")
    return tag


def template_fields(template: str) -> set[str]:
    """The `{field}` names a template uses; raises ValueError on malformed braces."""
    names: set[str] = set()
    for _, field, spec, conv in string.Formatter().parse(template):
        if field is None:
            continue
        if not field or spec or conv or not field.isidentifier():
            raise ValueError(f"tag template {template!r}: only plain {{field}} placeholders allowed")
        names.add(field)
    return names
