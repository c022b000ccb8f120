"""Sigstore/cosign key-based image signatures (pure): where they live, the public key, and whether one accepts an image.

A signature is an image manifest tagged `sha256-<hex>.sig` in the image's repository; each layer is a
"simple signing" JSON payload that names the signed manifest digest, with the base64 signature over the
payload's exact bytes in the layer annotation `dev.cosignproject.cosign/signature` (sigstore/cosign
specs/SIGNATURE_SPEC.md). cosign and containers/image (skopeo, podman) write and read this same layout.

Fetching the manifest and blobs is the caller's job (it checks each blob against its digest and size); this
module only decides, and trusts nothing it is handed.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NoReturn

from agent.errors import ConfigError, ImageRejected
from agent.fetch.manifest import Descriptor, ManifestError, parse_descriptor
from agent.reference import DIGEST_RE

SIGNATURE_ANNOTATION = "dev.cosignproject.cosign/signature"
SIMPLE_SIGNING_TYPE = "application/vnd.dev.cosign.simplesigning.v1+json"
COSIGN_SIGNATURE_TYPE = "cosign container image signature"  # critical.type, SIGNATURE_SPEC.md "Simple Signing"

PAYLOAD_MAX_BYTES = 64 * 1024  # cosign's payloads are ~250 bytes; optional claims add a little
SIGNATURE_LAYERS_MAX = 32  # one layer per signature; cosign appends on each `cosign sign`
SIGNATURE_B64_MAX_CHARS = 4096  # an RSA-8192 signature is 1,368 base64 characters
PUBLIC_KEY_PEM_MAX_BYTES = 16 * 1024
RSA_MIN_BITS = 2048

if TYPE_CHECKING:  # cryptography (~8 MiB resident) is imported only where a signature is required
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey
else:
    PublicKey = object  # a name to import; what it stands for is the checker's business

# ECDSA hashes per curve. cosign (`signature.LoadVerifier(key, crypto.SHA256)` for a --key) and containers/image
# (`sigstoreHarcodedHashAlgorithm = crypto.SHA256`) hash with SHA-256 on every curve; sigstore's newer defaults
# pair P-384 with SHA-384 and P-521 with SHA-512, so those are accepted too.
_EC_HASHES: dict[str, tuple[str, ...]] = {
    "secp256r1": ("SHA256",),
    "secp384r1": ("SHA256", "SHA384"),
    "secp521r1": ("SHA256", "SHA512"),
}
_KEY_KINDS = "an ECDSA P-256/P-384/P-521, Ed25519 or RSA (2048 bits or more) PEM 'PUBLIC KEY', such as cosign.pub"

# What the operator can do, per kind of refusal.
_UNSIGNED, _MALFORMED, _WRONG_KEY, _WRONG_IMAGE, _WRONG_REPOSITORY = range(5)
_Refusal = tuple[int, str]  # (kind, what is wrong)
_HINTS = {
    _UNSIGNED: "sign the image digest with `cosign sign --key cosign.key REPO@DIGEST` (or `skopeo copy "
    "--sign-by-sigstore-private-key` with use-sigstore-attachments) in the repository the agent pulls from",
    _MALFORMED: "the attachment is not a cosign key-based signature; sign the image again with `cosign sign --key`",
    _WRONG_KEY: "the image was signed with another key: sign it with the private key of the configured public key, "
    "or configure the public key it was signed with",
    _WRONG_IMAGE: "the signature is for another manifest (was the tag pushed again after signing?); sign the "
    "digest the tag points to now",
    _WRONG_REPOSITORY: "the signature names another repository; sign the image as it is published here, or turn "
    "off the repository match",
}


class SignatureRefused(ImageRejected):
    """No signature attached to the image verifies with the configured key and names this image's digest.

    `reasons` holds what was wrong with each signature looked at, in order.
    """

    def __init__(self, message: str, *, reasons: tuple[str, ...] = (), hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reasons = reasons


def signature_tag(manifest_digest: str) -> str:
    """The tag cosign stores the signatures of `manifest_digest` under: `sha256-<hex>.sig`."""
    if not DIGEST_RE.match(manifest_digest):
        raise ValueError(f"{manifest_digest!r} is not a sha256:<64 hex> digest")
    return manifest_digest.replace(":", "-", 1) + ".sig"


def unsigned(repository: str, manifest_digest: str) -> SignatureRefused:
    """The refusal for an image whose signature tag does not exist at all."""
    return SignatureRefused(
        f"{repository}@{manifest_digest} is not signed: the repository has no tag {signature_tag(manifest_digest)}",
        reasons=("no signature tag",),
        hint=_HINTS[_UNSIGNED],
    )


def load_public_key(pem: bytes, source: str) -> PublicKey:
    """The verification key from a PEM "PUBLIC KEY" block; a ConfigError naming `source` for anything else."""

    def refuse(problem: str) -> ConfigError:
        return ConfigError(source, None, problem, valid=_KEY_KINDS)

    if not isinstance(pem, bytes) or len(pem) > PUBLIC_KEY_PEM_MAX_BYTES:
        raise refuse("is not a public key file (not bytes, or over 16 KiB)")
    blocks = pem.count(b"-----BEGIN ")
    if blocks != 1 or b"-----BEGIN PUBLIC KEY-----" not in pem:
        if b"PRIVATE KEY-----" in pem:
            raise refuse("holds a private key; configure the public key (cosign.pub) instead")
        if b"-----BEGIN CERTIFICATE-----" in pem:
            raise refuse("holds a certificate; keyless (Fulcio) signatures are not supported, configure a public key")
        raise refuse(f"has {blocks} PEM blocks, want exactly one 'PUBLIC KEY' block")
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 - see TYPE_CHECKING above
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: PLC0415

    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise refuse(f"is not a readable public key: {exc}") from exc
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_HASHES:
            raise refuse(f"is an ECDSA key on curve {key.curve.name}, which cosign does not use")
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < RSA_MIN_BITS:
            raise refuse(f"is a {key.key_size}-bit RSA key, too weak")
        return key
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    raise refuse(f"is a {type(key).__name__}, not a key type cosign signs with")


def verify(
    public_key: PublicKey,
    manifest_digest: str,
    repository: str,
    signature_manifest: Mapping[str, Any],
    read_layer: Callable[[Descriptor], bytes],
    *,
    match_repository: bool = False,
) -> None:
    """Accept the image `repository@manifest_digest` if any layer of its signature manifest is a simple-signing
    payload, signed by `public_key` over its exact bytes, of type "cosign container image signature", naming
    `manifest_digest` in critical.image.docker-manifest-digest; else raise SignatureRefused saying what was wrong
    with each layer. The type is required as containers/image requires it (cosign's SimpleClaimVerifier checks
    only the digest, but cosign and containers/image both always write the type).

    `repository` is `registry/path` (Reference.name), used in messages. critical.identity.docker-reference is
    not checked by default, as `cosign verify --key` does not check it and SIGNATURE_SPEC.md says the field "is
    ignored": the digest binds the signature to the content, and a mirrored copy (`skopeo copy`, `cosign copy`)
    keeps the signature that names the original repository. containers/image checks it by policy (signedIdentity,
    default matchRepoDigestOrExact); `match_repository=True` does what its matchRepository does: the reference,
    without tag or digest, must be `repository` — which refuses mirrors.

    `read_layer(desc)` fetches a payload blob (the caller checks its digest and size); only layers of the
    simple-signing type, at most PAYLOAD_MAX_BYTES, with a well-formed signature annotation are read. Its errors
    (a registry that cannot be reached, a digest mismatch) propagate: they are no verdict on the signature.
    Payload JSON is read only after its signature verifies, with exact lowercase keys and no duplicate keys
    (containers/image's strict parser; cosign's Go decoder would also match keys case-insensitively).
    """
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: PLC0415 - see TYPE_CHECKING

    if not isinstance(public_key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
        raise TypeError(f"public_key is a {type(public_key).__name__}; use load_public_key")
    if not DIGEST_RE.match(manifest_digest):
        raise ValueError(f"{manifest_digest!r} is not a sha256:<64 hex> digest")
    image = f"{repository}@{manifest_digest}"
    if not isinstance(signature_manifest, Mapping):
        _refuse(image, [(_MALFORMED, "the signature manifest is not a JSON object")])
    layers = signature_manifest.get("layers")
    if not isinstance(layers, list):
        _refuse(image, [(_MALFORMED, "the signature manifest has no layers list")])
    if not layers:
        _refuse(image, [(_UNSIGNED, f"no signature layers in {signature_tag(manifest_digest)}")])
    if len(layers) > SIGNATURE_LAYERS_MAX:
        _refuse(image, [(_MALFORMED, f"{len(layers)} signature layers, over the limit of {SIGNATURE_LAYERS_MAX}")])
    refusals: list[_Refusal] = []
    for index, entry in enumerate(layers):
        refusal = _check_layer(
            entry, read_layer, key=public_key, digest=manifest_digest, repository=repository, match=match_repository
        )
        if refusal is None:
            return
        refusals.append((refusal[0], f"layer {index}: {refusal[1]}"))
    _refuse(image, refusals)


def _check_layer(
    entry: Any, read_layer: Callable[[Descriptor], bytes], *, key: PublicKey, digest: str, repository: str, match: bool
) -> _Refusal | None:
    """None when this layer accepts the image, else what is wrong with it."""
    try:
        desc = parse_descriptor(entry, "the layer")
    except ManifestError as exc:
        return _MALFORMED, str(exc)
    if desc.media_type != SIMPLE_SIGNING_TYPE:
        return _MALFORMED, f"media type {desc.media_type!r} is not a simple-signing payload ({SIMPLE_SIGNING_TYPE})"
    if desc.size > PAYLOAD_MAX_BYTES:
        return _MALFORMED, f"the payload is {desc.size} bytes, over the limit of {PAYLOAD_MAX_BYTES}"
    annotations = entry.get("annotations")
    encoded = annotations.get(SIGNATURE_ANNOTATION) if isinstance(annotations, dict) else None
    if encoded is None:
        return _MALFORMED, f"no {SIGNATURE_ANNOTATION} annotation"
    signature = _decode_signature(encoded)
    if signature is None:
        return _MALFORMED, f"the {SIGNATURE_ANNOTATION} annotation is not base64"
    payload = read_layer(desc)
    if not isinstance(payload, bytes) or len(payload) != desc.size:
        return _MALFORMED, f"the payload read is not the {desc.size} bytes its descriptor names"
    if not _signature_verifies(key, signature, payload):
        return _WRONG_KEY, "the signature does not verify with the key"
    return _check_payload(payload, digest, repository, match)


def _check_payload(payload: bytes, manifest_digest: str, repository: str, match_repository: bool) -> _Refusal | None:
    """None when a payload whose signature verified accepts the image, else what is wrong with it."""
    try:
        doc = json.loads(payload, object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return _MALFORMED, f"the payload is not JSON ({type(exc).__name__}: {str(exc)[:100]})"
    critical = doc.get("critical") if isinstance(doc, dict) else None
    if not isinstance(critical, dict):
        return _MALFORMED, "the payload has no critical object; not a simple-signing payload"
    kind = critical.get("type")
    if kind != COSIGN_SIGNATURE_TYPE:
        return _MALFORMED, f"the payload type is {_show(kind)}, not {COSIGN_SIGNATURE_TYPE!r}"
    image = critical.get("image")
    signed = image.get("docker-manifest-digest") if isinstance(image, dict) else None
    if not isinstance(signed, str):
        return _MALFORMED, "the payload has no critical.image.docker-manifest-digest string"
    if signed != manifest_digest:
        return _WRONG_IMAGE, f"the payload is for digest {_show(signed)}, not {manifest_digest}"
    if not match_repository:
        return None
    identity = critical.get("identity")
    reference = identity.get("docker-reference") if isinstance(identity, dict) else None
    if not isinstance(reference, str):
        return _MALFORMED, "the payload has no critical.identity.docker-reference string"
    if _repository_of(reference) != repository:
        return _WRONG_REPOSITORY, f"the payload is for repository {_show(reference)}, not {repository}"
    return None


def _decode_signature(encoded: object) -> bytes | None:
    """Standard base64 with padding, as Go's base64.StdEncoding; None when it is not."""
    if not isinstance(encoded, str) or not encoded or len(encoded) > SIGNATURE_B64_MAX_CHARS:
        return None
    try:
        return base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        return None


def _signature_verifies(key: PublicKey, signature: bytes, payload: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature  # noqa: PLC0415 - see TYPE_CHECKING above
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa  # noqa: PLC0415

    try:
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, payload)
            return True
        if isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, payload, padding.PKCS1v15(), hashes.SHA256())
            return True
    except InvalidSignature:
        return False
    for name in _EC_HASHES.get(key.curve.name, ()):
        try:
            key.verify(signature, payload, ec.ECDSA(getattr(hashes, name)()))  # ASN.1 DER (Go: ecdsa.SignASN1)
        except InvalidSignature:
            continue
        return True
    return False


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object with each key once: a payload with two digests could mean one thing to us, another to Go."""
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"duplicate key {key!r}")
        doc[key] = value
    return doc


def _repository_of(reference: str) -> str:
    """`host/path` of a docker reference, without its @digest and :tag."""
    name = reference.partition("@")[0]
    host, slash, path = name.partition("/")
    if slash and ":" in path.rsplit("/", 1)[-1]:
        name = f"{host}/{path.rpartition(':')[0]}"
    return name


def _show(value: object) -> str:
    """A value from the payload, quoted and cut short for a message."""
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _refuse(image: str, refusals: list[_Refusal]) -> NoReturn:
    reasons = tuple(why for _, why in refusals)
    hints = list(dict.fromkeys(_HINTS[kind] for kind, _ in refusals))
    raise SignatureRefused(
        f"{image}: no signature accepts the image: {'; '.join(reasons)}", reasons=reasons, hint="; ".join(hints)
    )
