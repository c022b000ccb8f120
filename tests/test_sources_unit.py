"""The order and the verdicts of Sources (agent/fetch/sources.py), with sources that answer what each test says:
which source is asked, which failures pass to the next, which are final, pins and signatures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.errors import (
    Cancelled,
    DigestMismatch,
    HostError,
    ImageMissing,
    ImageRejected,
    RegistryError,
    RegistryUnavailable,
)
from agent.fetch.engine import _same_repository
from agent.fetch.manifest import OCI_MANIFEST, Descriptor, Platform, ResolvedImage
from agent.fetch.signature import SignatureRefused
from agent.fetch.sources import AVOID_S, Signature, Sources, Trust
from agent.reference import Reference
from support.cosign import generate, layer, signature_manifest, simple_signing_payload

AMD64 = Platform("linux", "amd64")
REF = Reference("reg.example", "nvidia/driver", "535")
D1, D2, CONFIG = "sha256:" + "1" * 64, "sha256:" + "2" * 64, "sha256:" + "c" * 64


class Fake:
    """A source that resolves to `digest`, or raises `error`; holds `signatures` by digest."""

    def __init__(self, name: str, digest: str | None = D1, error: Exception | None = None,
                 signatures: dict[str, Signature] | None = None) -> None:
        self.name, self.digest, self.error = name, digest, error
        self.signatures = signatures or {}
        self.asked: list[str] = []

    def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        self.asked.append(str(ref))
        if self.error is not None:
            raise self.error
        assert self.digest is not None
        return ResolvedImage(ref.with_digest(self.digest), None, OCI_MANIFEST, Descriptor("c", CONFIG, 2), (),
                             origin=self.name)

    def config(self, image: ResolvedImage) -> dict[str, Any]:
        return {}

    def space(self, image: ResolvedImage) -> list[tuple[Path, int, str]]:
        return []

    def layer(self, image: ResolvedImage, desc: Descriptor, cancelled: Callable[[], bool]) -> Path:
        return Path("/nonexistent")

    def landing(self, image: ResolvedImage, desc: Descriptor) -> Path | None:
        return None

    def release(self, image: ResolvedImage) -> None:
        pass

    def signature(self, image: ResolvedImage, digest: str) -> Signature | None:
        return self.signatures.get(digest)


def test_the_first_source_that_has_it_wins_and_missing_passes_on() -> None:
    imported, engine, origin = Fake("imported", error=ImageMissing("no")), Fake("engine", D2), Fake("registry")
    image = Sources([imported, engine, origin]).resolve(REF, AMD64)
    assert (image.origin, image.reference.digest) == ("engine", D2)
    assert origin.asked == []


@pytest.mark.parametrize("error", [RegistryUnavailable("down"), DigestMismatch("lies"), ImageMissing("404")])
def test_a_mirror_that_fails_is_skipped_with_a_warning(error: Exception) -> None:
    mirror, origin = Fake("mirror m.example", error=error), Fake("registry")
    with capture_logs() as logs:
        assert Sources([mirror, origin]).resolve(REF, AMD64).origin == "registry"
    assert [e["event"] for e in logs if e["log_level"] == "warning"] == ["mirror_skipped"]


@pytest.mark.parametrize("error", [RegistryUnavailable("down"), DigestMismatch("lies"), RegistryError("denied"),
                                   ImageRejected("bad"), SignatureRefused("unsigned")])
def test_only_the_origin_is_final_and_only_the_hosts_own_trouble_stops_early(error: Exception) -> None:
    for name in ("imported", "engine", "mirror m.example"):
        origin = Fake("registry")
        with capture_logs() as logs:
            assert Sources([Fake(name, error=error), origin]).resolve(REF, AMD64).origin == "registry"
        assert any(e["log_level"] == "warning" and e.get("source") == name for e in logs), logs
    with pytest.raises(type(error)):
        Sources([Fake("mirror m", error=ImageMissing("x")), Fake("registry", error=error)]).resolve(REF, AMD64)
    for own in (HostError("disk full"), Cancelled("stop")):
        origin = Fake("registry")
        with pytest.raises(type(own)):
            Sources([Fake("engine", error=own), origin]).resolve(REF, AMD64)
        assert origin.asked == []


def test_a_mirror_that_fails_mid_install_is_left_out_for_a_while() -> None:
    now = [0.0]
    mirror, origin = Fake("mirror m"), Fake("registry")
    sources = Sources([mirror, origin], clock=lambda: now[0])
    image = sources.resolve(REF, AMD64)
    assert image.origin == "mirror m"
    sources.avoid(image, RegistryUnavailable("blob broke off"))
    assert sources.resolve(REF, AMD64).origin == "registry"
    now[0] = AVOID_S + 1
    assert sources.resolve(REF, AMD64).origin == "mirror m"


def test_a_pin_skips_a_source_with_another_image_and_refuses_at_the_origin() -> None:
    pinned = REF.with_digest(D2)
    engine, origin = Fake("engine", D1), Fake("registry", D2)
    assert Sources([engine, origin]).resolve(pinned, AMD64).origin == "registry"
    with pytest.raises(DigestMismatch, match="not the pinned"):
        Sources([Fake("registry", D1)]).resolve(pinned, AMD64)
    config_pinned = REF.with_digest(CONFIG)  # docker's image ID (the config digest) pins too
    assert Sources([Fake("engine", D1)]).resolve(config_pinned, AMD64).origin == "engine"


def signed(key: Any, digest: str, repo: str = "reg.example/nvidia/driver") -> Signature:
    payload = simple_signing_payload(digest, repo)
    manifest = signature_manifest([layer(payload, key.sign_b64(payload))])
    return manifest, lambda _desc: payload


def test_a_signature_is_looked_for_where_the_image_came_from_then_imported_then_the_origin() -> None:
    key = generate()
    trust = Trust(key.private_key.public_key(), "cosign.pub")
    engine = Fake("engine", D1)  # the engine keeps none
    imported = Fake("imported", error=ImageMissing("no"), signatures={D1: signed(key, D1)})
    origin = Fake("registry")
    with capture_logs() as logs:
        assert Sources([imported, engine, origin], trust).resolve(REF, AMD64).origin == "engine"
    assert [e.get("where") for e in logs if e["event"] == "signature_verified"] == ["imported"]

    with pytest.raises(SignatureRefused, match="is not signed"):
        Sources([Fake("engine", D1), Fake("registry")], trust).resolve(REF, AMD64)
    other = generate()
    with pytest.raises(SignatureRefused):
        Sources([Fake("registry", D1, signatures={D1: signed(other, D1)})], trust).resolve(REF, AMD64)


def test_a_signature_at_the_origin_serves_a_mirrored_image_and_an_unsigned_mirror_image_is_skipped() -> None:
    """A stale .sig at the mirror does not hide the origin's good one for the same digest; an image that no
    place holds a good signature for (D2 at the mirror) is skipped, and the origin's own decides."""
    key, other = generate(), generate()
    trust = Trust(key.private_key.public_key(), "cosign.pub")
    mirror = Fake("mirror m", D1, signatures={D1: signed(other, D1)})
    origin = Fake("registry", D1, signatures={D1: signed(key, D1)})
    with capture_logs() as logs:
        assert Sources([mirror, origin], trust).resolve(REF, AMD64).origin == "mirror m"
    assert [e.get("where") for e in logs if e["event"] == "signature_verified"] == ["registry"]
    lying = Fake("mirror m", D2, signatures={D2: signed(other, D2)})
    with capture_logs() as logs:
        assert Sources([lying, origin], trust).resolve(REF, AMD64).origin == "registry"
    assert any(e["event"] == "mirror_skipped" for e in logs)


@pytest.mark.parametrize(("named", "same"), [
    ("nvidia/driver", False), ("reg.example/nvidia/driver", True), ("reg.example/other", False),
])
def test_the_engine_reads_repo_digests_as_docker_writes_them(named: str, same: bool) -> None:
    assert _same_repository(named, REF) is same
    hub = Reference("docker.io", "nvidia/driver", "535")
    assert _same_repository("nvidia/driver", hub), "docker writes docker.io's names short"
    assert not _same_repository("library/nvidia", hub)
