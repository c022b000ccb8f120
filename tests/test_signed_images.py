"""image.verify (issue 10): the daemon installs only images signed by the configured key.

The signatures are made by a third-party signer, `openssl dgst -sha256 -sign` (ECDSA P-256 over
the simple-signing payload's exact bytes: what `cosign sign --key` computes), and the signature
attachment the agent reads is the one skopeo 1.9.3 writes when it copies a signed image with
`use-sigstore-attachments` (Debian's skopeo cannot sign itself: tests/test_signature.py).
Signatures made by real cosign are verified in tests/test_signature.py from its own fixtures.
"""

from __future__ import annotations

import base64
import json
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_signature import _skopeo

from agent.fetch.signature import signature_tag
from support.cosign import layer, signature_manifest, simple_signing_payload
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, K2, REPO, Host, push_driver, tag, write

pytestmark = [pytest.mark.integration, pytest.mark.subprocess]

STAGING = "staging/driver"  # where the image is built and signed; skopeo copies both into REPO
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def openssl_key(directory: Path, name: str) -> tuple[Path, Path]:
    """An ECDSA P-256 key made by openssl: (private, public PEM)."""
    key, pub = directory / f"{name}.key", directory / f"{name}.pub"
    subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(key)], check=True)
    subprocess.run(["openssl", "ec", "-in", str(key), "-pubout", "-out", str(pub)], check=True, capture_output=True)
    return key, pub


def openssl_sign(key: Path, payload: bytes, directory: Path) -> str:
    (directory / "payload").write_bytes(payload)
    subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(key), "-out", str(directory / "sig"),
                    str(directory / "payload")], check=True)
    return base64.b64encode((directory / "sig").read_bytes()).decode()


def attach(registry: RegistryServer, repo: str, digest: str, payload: bytes, signature: str) -> None:
    """Push the sha256-<hex>.sig artifact cosign would push: payload blob, config, manifest."""
    registry.pusher.push_blob(repo, payload)
    registry.pusher.push_blob(repo, b"{}")
    body = json.dumps(signature_manifest([layer(payload, signature)])).encode()
    registry.pusher.push_manifest(repo, signature_tag(digest), body, OCI_MANIFEST)


def skopeo_with_attachments(tmp_path: Path, registry: RegistryServer, src: str, dest: str) -> None:
    done = _skopeo(tmp_path, registry, "copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false",
                   f"docker://{src}", f"docker://{dest}")
    assert done.returncode == 0, done.stderr


def signed_driver(tmp_path: Path, registry: RegistryServer, kernel: str, key: Path, *,
                  payload_digest: str | None = None) -> str:
    """Build the driver for `kernel` in STAGING, sign it there with openssl, skopeo-copy image and signature
    into REPO; the digest. `payload_digest` makes the payload name another image."""
    tmp_path = Path(tempfile.mkdtemp(dir=tmp_path))  # a build of its own: the same kernel is built again
    digest = push_driver(tmp_path, registry.host, kernel, repo=STAGING)
    payload = simple_signing_payload(payload_digest or digest, f"{registry.host}/{STAGING}")
    attach(registry, STAGING, digest, payload, openssl_sign(key, payload, tmp_path))
    skopeo_with_attachments(tmp_path, registry, f"{registry.host}/{STAGING}:{tag(kernel)}",
                            f"{registry.host}/{REPO}:{tag(kernel)}")
    return digest


def trust(host: Host, registry: RegistryServer, pub: Path) -> None:
    write(host.root / "etc/nvidia-agent/cosign.pub", pub.read_bytes())
    host.configure(registry.host, image='attempts = 1\n[image.verify]\npublic_key = "/etc/nvidia-agent/cosign.pub"\n')


def test_signed_by_a_third_party_tool_installs_and_the_rest_is_refused(tmp_path: Path, registry: RegistryServer,
                                                                        host: Host) -> None:
    key, pub = openssl_key(tmp_path, "good")
    signed_driver(tmp_path, registry, K1, key)
    trust(host, registry, pub)
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "signature_verified" in run.stdout, run.stdout
    good = f"{DRIVER}/ubuntu-22.04-{K1}"
    assert host.current() == good

    host.set_kernel(K2)  # the next kernel's image: unsigned, then signed by another key, then for another image
    push_driver(tmp_path / "unsigned", registry.host, K2)
    run = host.once()
    assert run.returncode != 0 and "is not signed" in run.stdout + run.stderr, run.stdout + run.stderr

    other_key, _ = openssl_key(tmp_path, "other")
    signed_driver(tmp_path, registry, K2, other_key)
    run = host.once()
    assert run.returncode != 0 and "another key" in run.stdout + run.stderr, run.stdout + run.stderr

    signed_driver(tmp_path, registry, K2, key, payload_digest="sha256:" + "ab" * 32)
    run = host.once()
    assert run.returncode != 0 and "sha256:" + "ab" * 32 in run.stdout + run.stderr, run.stdout + run.stderr

    assert host.current() == good, "a refused image never replaces what runs"
    assert not (host.root / f"opt/nvidia/{DRIVER}/ubuntu-22.04-{K2}").exists() and host.debris() == []


def test_an_imported_image_with_its_imported_signature_installs_offline(tmp_path: Path, registry: RegistryServer,
                                                                        host: Host) -> None:
    key, pub = openssl_key(tmp_path, "good")
    digest = signed_driver(tmp_path, registry, K1, key)
    name = f"{registry.host}/{REPO}:{tag(K1)}"
    sig = f"{registry.host}/{REPO}:{signature_tag(digest)}"
    for src, archive in ((name, tmp_path / "image.tar"), (sig, tmp_path / "signature.tar")):
        subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{src}",
                        f"oci-archive:{archive}:{src.rsplit(':', 1)[1]}"], check=True, timeout=120)
    registry.stop()
    trust(host, registry, pub)
    for archive in ("image.tar", "signature.tar"):
        out = host.agent("import", str(tmp_path / archive))
        assert out.returncode == 0, out.stdout + out.stderr
    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert "signature_verified" in run.stdout and "where=imported" in run.stdout, run.stdout
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"


def test_a_key_that_is_not_a_public_key_is_a_configuration_error(tmp_path: Path, registry: RegistryServer,
                                                                 host: Host) -> None:
    key, _ = openssl_key(tmp_path, "good")
    trust(host, registry, key)  # the private key by mistake
    run = host.once()
    assert run.returncode == 78, run.stdout + run.stderr
    assert "image.verify.public_key: holds a private key" in run.stderr, run.stderr
