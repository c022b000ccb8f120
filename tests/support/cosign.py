"""Test-only cosign keys and signatures: key pairs, cosign's encrypted private key PEM, simple-signing payloads.

The private key file is what `cosign generate-key-pair` writes (sigstore/cosign pkg/cosign/keys.go): PKCS#8 DER,
encrypted by `encrypted.Encrypt` of theupdateframework/go-tuf (later secure-systems-lab/go-securesystemslib) —
scrypt N=32768 r=8 p=1 over a 32-byte salt, then a NaCl secretbox with a 24-byte nonce — as the JSON document
`{"kdf": {"name": "scrypt", "params": {"N", "r", "p"}, "salt"}, "cipher": {"name": "nacl/secretbox", "nonce"},
"ciphertext"}` (bytes as padded standard base64, Go's encoding of []byte) inside a PEM block. containers/image
v5.2x (skopeo 1.9) reads only the PEM type "ENCRYPTED COSIGN PRIVATE KEY" and only those scrypt parameters
(go-tuf's `CheckParams`); cosign 2.x writes "ENCRYPTED SIGSTORE PRIVATE KEY" and still reads both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

import nacl.secret
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

COSIGN_PRIVATE_PEM = "ENCRYPTED COSIGN PRIVATE KEY"
SIGSTORE_PRIVATE_PEM = "ENCRYPTED SIGSTORE PRIVATE KEY"
SCRYPT_N, SCRYPT_R, SCRYPT_P = 32768, 8, 1
SCRYPT_MAXMEM_BYTES = 64 * 1024 * 1024  # 128 * N * r = 32 MiB, over hashlib's 32 MiB default
SALT_BYTES = 32
KEY_BYTES = 32

SIMPLE_SIGNING_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
KINDS = ("p256", "p384", "ed25519", "rsa2048")


@dataclass(frozen=True)
class KeyPair:
    """A signing key as cosign and containers/image use it: ECDSA and RSA hash with SHA-256, Ed25519 signs the
    payload itself."""

    private_key: PrivateKey

    def public_pem(self) -> bytes:
        """The public key as cosign writes cosign.pub: PEM "PUBLIC KEY" (SubjectPublicKeyInfo)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def encrypted_private_pem(self, passphrase: bytes, pem_type: str = COSIGN_PRIVATE_PEM) -> bytes:
        """The private key in cosign's encrypted PEM format (see the module docstring)."""
        der = self.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        salt = secrets.token_bytes(SALT_BYTES)
        box = nacl.secret.SecretBox(_scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P))
        nonce = secrets.token_bytes(nacl.secret.SecretBox.NONCE_SIZE)
        doc = {
            "kdf": {"name": "scrypt", "params": {"N": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P}, "salt": _b64(salt)},
            "cipher": {"name": "nacl/secretbox", "nonce": _b64(nonce)},
            "ciphertext": _b64(box.encrypt(der, nonce).ciphertext),  # tag || ciphertext, as Go's secretbox.Seal
        }
        return _pem(pem_type, json.dumps(doc, separators=(",", ":")).encode())

    def sign(self, payload: bytes) -> bytes:
        """A raw signature over `payload` as cosign makes it (ECDSA: ASN.1 DER)."""
        key = self.private_key
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(payload, ec.ECDSA(hashes.SHA256()))
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(payload, padding.PKCS1v15(), hashes.SHA256())
        return key.sign(payload)

    def sign_b64(self, payload: bytes) -> str:
        """The signature as the layer annotation carries it: standard base64."""
        return base64.b64encode(self.sign(payload)).decode()


def generate(kind: str = "p256") -> KeyPair:
    """A fresh key pair: p256 (cosign's default), p384, ed25519 or rsa2048."""
    if kind == "p256":
        return KeyPair(ec.generate_private_key(ec.SECP256R1()))
    if kind == "p384":
        return KeyPair(ec.generate_private_key(ec.SECP384R1()))
    if kind == "ed25519":
        return KeyPair(ed25519.Ed25519PrivateKey.generate())
    if kind == "rsa2048":
        return KeyPair(rsa.generate_private_key(public_exponent=65537, key_size=2048))
    raise ValueError(f"unknown key kind {kind!r}; want one of {KINDS}")


def decrypt_private_pem(pem: bytes, passphrase: bytes) -> PrivateKey:
    """Read back an encrypted cosign private key (what go-tuf's `encrypted.Decrypt` does), for round-trip tests."""
    text = pem.decode()
    begin, end = text.index("-----BEGIN "), text.index("-----END ")
    header = text[begin:].split("\n", 1)[0]
    if header.removeprefix("-----BEGIN ").removesuffix("-----") not in (COSIGN_PRIVATE_PEM, SIGSTORE_PRIVATE_PEM):
        raise ValueError(f"unexpected PEM block {header!r}")
    body = text[text.index("\n", begin) + 1 : end]
    doc = json.loads(base64.b64decode("".join(body.split())))
    params = doc["kdf"]["params"]
    if (doc["kdf"]["name"], doc["cipher"]["name"]) != ("scrypt", "nacl/secretbox"):
        raise ValueError(f"unexpected kdf/cipher {doc['kdf']['name']!r}/{doc['cipher']['name']!r}")
    key = _scrypt(passphrase, base64.b64decode(doc["kdf"]["salt"]), params["N"], params["r"], params["p"])
    nonce = base64.b64decode(doc["cipher"]["nonce"])
    der = nacl.secret.SecretBox(key).decrypt(base64.b64decode(doc["ciphertext"]), nonce)
    loaded = serialization.load_der_private_key(der, password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"unexpected key type {type(loaded).__name__}")
    return loaded


def simple_signing_payload(
    manifest_digest: str,
    docker_reference: str,
    *,
    signature_type: str = COSIGN_SIGNATURE_TYPE,
    optional: dict[str, Any] | None = None,
) -> bytes:
    """A simple-signing payload shaped as containers/image writes it (Go's json.Marshal: sorted keys, compact)."""
    doc = {
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": manifest_digest},
            "type": signature_type,
        },
        "optional": optional if optional is not None else {"creator": "tests/support/cosign.py"},
    }
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def layer(payload: bytes, annotation: object, *, media_type: str = SIMPLE_SIGNING_TYPE) -> dict[str, Any]:
    """One layer entry of a signature manifest for `payload`, carrying `annotation` as its signature."""
    return {
        "mediaType": media_type,
        "digest": "sha256:" + hashlib.sha256(payload).hexdigest(),
        "size": len(payload),
        "annotations": {SIGNATURE_ANNOTATION: annotation},
    }


def signature_manifest(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """A cosign signature manifest over `layers` (the config is cosign's empty-ish one; nothing reads it)."""
    config = b"{}"
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": layers,
    }


def _scrypt(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, maxmem=SCRYPT_MAXMEM_BYTES, dklen=KEY_BYTES)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _pem(pem_type: str, data: bytes) -> bytes:
    body = base64.b64encode(data).decode()
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {pem_type}-----", *lines, f"-----END {pem_type}-----", ""]).encode()
