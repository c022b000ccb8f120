"""The order and the verdicts of Sources (agent/fetch/sources.py), with sources that answer what each test says:
which source is asked, which failures pass to the next, which are final, pins and signatures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent.errors import DigestMismatch, ImageMissing, RegistryError, RegistryUnavailable
from agent.fetch.manifest import OCI_MANIFEST, Descriptor, Platform, ResolvedImage
from agent.fetch.signature import SignatureRefused
from agent.fetch.sources import Signature, Sources, Trust
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


@pytest.mark.parametrize("error", [RegistryUnavailable("down"), DigestMismatch("lies"), RegistryError("denied")])
def test_what_the_engine_or_the_origin_says_beyond_missing_is_final(error: Exception) -> None:
    with pytest.raises(type(error)):
        Sources([Fake("engine", error=error), Fake("registry")]).resolve(REF, AMD64)
    with pytest.raises(type(error)):
        Sources([Fake("mirror m", error=ImageMissing("x")), Fake("registry", error=error)]).resolve(REF, AMD64)


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


def test_a_mirror_with_a_bad_signature_is_skipped_and_the_origin_decides() -> None:
    key, other = generate(), generate()
    trust = Trust(key.private_key.public_key(), "cosign.pub")
    mirror = Fake("mirror m", D1, signatures={D1: signed(other, D1)})
    origin = Fake("registry", D1, signatures={D1: signed(key, D1)})
    with capture_logs() as logs:
        assert Sources([mirror, origin], trust).resolve(REF, AMD64).origin == "registry"
    assert any(e["event"] == "mirror_skipped" for e in logs)

