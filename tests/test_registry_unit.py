"""Pure parts of the registry client and credentials: challenges, manifests, platforms, config.json."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests

from agent.credentials import HELPER_CACHE_S, Credentials, registry_from_key
from agent.errors import ConfigError, RegistryError
from agent.fetch.auth import Challenge, parse_retry_after, parse_www_authenticate
from agent.fetch.manifest import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    Descriptor,
    ManifestError,
    Platform,
    load_json_object,
    manifest_media_type,
    parse_descriptor,
    parse_image_manifest,
    parse_index,
    select_manifest,
)
from agent.fetch.registry import RegistryClient
from agent.reference import Reference

FIXTURES = Path(__file__).parent / "fixtures" / "registry"
DIGEST = "sha256:" + "ab" * 32
OTHER = "sha256:" + "cd" * 32


def fixture_json(name: str) -> dict[str, Any]:
    doc = json.loads((FIXTURES / name).read_text())
    assert isinstance(doc, dict)
    return doc


# --- WWW-Authenticate ---------------------------------------------------------------------------

CHALLENGES = [
    (
        'Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull"',
        [
            Challenge(
                "bearer",
                {"realm": "https://auth.example/token", "service": "reg.example", "scope": "repository:a/b:pull"},
            )
        ],
    ),
    (
        'Bearer realm="https://auth.example/token",scope="repository:a:pull,push"',
        [Challenge("bearer", {"realm": "https://auth.example/token", "scope": "repository:a:pull,push"})],
    ),
    ('Basic realm="Registry Realm"', [Challenge("basic", {"realm": "Registry Realm"})]),
    ("basic realm=simple", [Challenge("basic", {"realm": "simple"})]),
    (
        'Basic realm="a", Bearer realm="b",service="s"',
        [Challenge("basic", {"realm": "a"}), Challenge("bearer", {"realm": "b", "service": "s"})],
    ),
    ("Negotiate, Basic realm=x", [Challenge("negotiate", {}), Challenge("basic", {"realm": "x"})]),
    ('Negotiate abc==, Basic realm="q\\"x"', [Challenge("negotiate", {}), Challenge("basic", {"realm": 'q"x'})]),
    (
        'Bearer error="insufficient_scope" , realm="r"',
        [Challenge("bearer", {"error": "insufficient_scope", "realm": "r"})],
    ),
    ('BEARER REALM="r"', [Challenge("bearer", {"realm": "r"})]),
    ("Bearer", [Challenge("bearer", {})]),
    ("", []),
    ("===", []),
]


@pytest.mark.parametrize(("header", "expected"), CHALLENGES, ids=[c[0] or "empty" for c in CHALLENGES])
def test_www_authenticate_parses_into_challenges(header: str, expected: list[Challenge]) -> None:
    """Schemes are lowercased, quoted values unescaped, several challenges split, junk ignored."""
    assert parse_www_authenticate(header) == expected


def test_captured_acr_challenge_parses() -> None:
    """A challenge captured from a real cloud registry yields its realm, service and scope."""
    header = (FIXTURES / "www-authenticate-bearer-acr.txt").read_text().strip()
    (challenge,) = parse_www_authenticate(header)
    assert challenge.scheme == "bearer"
    assert challenge.params["realm"].endswith("/oauth2/token")
    assert challenge.params["scope"] == "repository:library/hello-world:metadata_read"


RETRY_AFTER = [
    (None, None),
    ("", None),
    ("7", 7.0),
    (" 0 ", 0.0),
    ("-3", None),
    ("soon", None),
    ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),  # 10 s after "now" below
    ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),  # in the past
]


@pytest.mark.parametrize(("value", "expected"), RETRY_AFTER)
def test_retry_after_accepts_seconds_and_dates(value: str | None, expected: float | None) -> None:
    """Retry-After is delta-seconds or an HTTP date; anything else is ignored."""
    now_s = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now_s) == expected


# --- platforms ----------------------------------------------------------------------------------

MACHINES = [
    ("x86_64", Platform("linux", "amd64")),
    ("aarch64", Platform("linux", "arm64", "v8")),
    ("arm64", Platform("linux", "arm64", "v8")),
    ("armv7l", Platform("linux", "arm", "v7")),
    ("ppc64le", Platform("linux", "ppc64le")),
    ("s390x", Platform("linux", "s390x")),
    ("mips64", Platform("linux", "mips64")),  # unknown machines pass through, to be listed as missing
]


@pytest.mark.parametrize(("machine", "expected"), MACHINES)
def test_host_platform_from_machine(machine: str, expected: Platform) -> None:
    """uname machine names map to OCI architecture/variant."""
    assert Platform.host(machine) == expected


MATCHES = [
    (Platform("linux", "amd64"), Platform("linux", "amd64"), True),
    (Platform("linux", "amd64"), Platform("linux", "arm64"), False),
    (Platform("linux", "amd64"), Platform("windows", "amd64"), False),
    (Platform("linux", "arm64", "v8"), Platform("linux", "arm64"), True),  # arm64 means v8
    (Platform("linux", "arm64"), Platform("linux", "arm64", "v8"), True),
    (Platform("linux", "arm", "v7"), Platform("linux", "arm", "v6"), False),
    (Platform("linux", "arm", "v7"), Platform("linux", "arm"), True),  # arm means v7
    (Platform("linux", "arm"), Platform("linux", "arm", "v5"), True),  # no variant wanted: any
]


@pytest.mark.parametrize(("want", "entry", "ok"), MATCHES, ids=[f"{w}~{e}" for w, e, _ in MATCHES])
def test_platform_matching(want: Platform, entry: Platform, ok: bool) -> None:
    """os and architecture must be equal; the variant only when one is wanted (normalized)."""
    assert want.matches(entry) is ok


def test_select_from_captured_manifest_list() -> None:
    """A real Docker manifest list: each host platform gets its own entry."""
    entries = parse_index(fixture_json("docker-manifest-list-ubi8-latest.json"))
    by_platform = {str(plat): desc.digest for desc, plat in entries}
    assert select_manifest(entries, Platform.host("x86_64")).digest == by_platform["linux/amd64"]
    assert select_manifest(entries, Platform.host("aarch64")).digest == by_platform["linux/arm64/v8"]
    assert select_manifest(entries, Platform.host("armv7l")).digest == by_platform["linux/arm/v7"]


def test_select_from_captured_oci_index() -> None:
    """A real OCI index with os.features: amd64 is picked, the ppc64le entry skipped."""
    entries = parse_index(fixture_json("oci-image-index.json"))
    assert select_manifest(entries, Platform("linux", "amd64")).digest.startswith("sha256:5b0bcabd")


def test_select_skips_attestations_and_lists_what_exists() -> None:
    """unknown/unknown entries (attestations) never match; a miss names the platforms on offer."""
    index = {
        "manifests": [
            {
                "mediaType": OCI_MANIFEST,
                "digest": DIGEST,
                "size": 1,
                "platform": {"os": "linux", "architecture": "arm64"},
            },
            {
                "mediaType": OCI_MANIFEST,
                "digest": OTHER,
                "size": 1,
                "platform": {"os": "unknown", "architecture": "unknown"},
            },
            {"mediaType": OCI_MANIFEST, "digest": OTHER, "size": 1},
            {"mediaType": OCI_INDEX, "digest": OTHER, "size": 1, "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }
    with pytest.raises(ManifestError, match=r"no linux/amd64 image in the index; it has linux/arm64$"):
        select_manifest(parse_index(index), Platform("linux", "amd64"))
    with pytest.raises(ManifestError, match="no platforms at all"):
        select_manifest([], Platform("linux", "amd64"))


# --- manifests ----------------------------------------------------------------------------------

MEDIA_TYPES = [
    ({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": {}}, "", OCI_MANIFEST),
    ({"schemaVersion": 2, "config": {}}, OCI_MANIFEST + "; charset=utf-8", OCI_MANIFEST),
    ({"schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": []}, DOCKER_LIST, DOCKER_LIST),
    ({"schemaVersion": 2, "manifests": []}, "application/json", OCI_INDEX),  # inferred from shape
    ({"schemaVersion": 2, "config": {}}, "", OCI_MANIFEST),
]


@pytest.mark.parametrize(("doc", "content_type", "expected"), MEDIA_TYPES)
def test_manifest_media_type(doc: dict[str, Any], content_type: str, expected: str) -> None:
    """The body's mediaType wins, then Content-Type, then the document's shape."""
    assert manifest_media_type(doc, content_type) == expected


def test_captured_manifests_have_their_types() -> None:
    """Real manifests from registries parse to their declared media types and layers."""
    docker = fixture_json("docker-manifest-v2s2-nginx-1.23.1-linux-amd64.json")
    assert manifest_media_type(docker, "application/json") == DOCKER_MANIFEST
    config, layers = parse_image_manifest(docker)
    assert config.size == 7653
    assert len(layers) == 6
    oci = fixture_json("oci-image-manifest.json")
    assert manifest_media_type(oci, "") == OCI_MANIFEST
    assert [layer.size for layer in parse_image_manifest(oci)[1]] == [32654, 16724, 73109]


BAD_MANIFESTS = [
    ({"schemaVersion": 1, "name": "x", "fsLayers": []}, "", "schema 1"),
    ({"schemaVersion": 2}, "application/vnd.docker.distribution.manifest.v1+prettyjws", "schema 1"),
    ({"schemaVersion": "2", "config": {}}, "", "schemaVersion is '2'"),
    ({"schemaVersion": True, "config": {}}, "", "schemaVersion is True"),
    ({"config": {}}, "", "schemaVersion is None"),
    ({"schemaVersion": 2, "mediaType": 7}, "", "mediaType is not a string"),
    ({"schemaVersion": 2, "mediaType": "application/vnd.oci.artifact.manifest.v1+json"}, "", "unsupported manifest"),
    ({"schemaVersion": 2}, "text/html", "unsupported manifest media type 'text/html'"),
    ({"schemaVersion": 2, "foo": 1}, "", "neither an image manifest nor an index"),
]


@pytest.mark.parametrize(("doc", "content_type", "message"), BAD_MANIFESTS)
def test_unsupported_manifests_are_refused(doc: dict[str, Any], content_type: str, message: str) -> None:
    """schema1, wrong schema versions and unknown types raise ManifestError, never KeyError."""
    with pytest.raises(ManifestError, match=message):
        manifest_media_type(doc, content_type)


def test_schema1_error_says_how_to_fix() -> None:
    """The schema1 refusal tells the operator to push the image again."""
    with pytest.raises(ManifestError) as info:
        manifest_media_type({"schemaVersion": 1}, "")
    assert info.value.hint is not None
    assert "push it again" in info.value.hint


GOOD = {"mediaType": OCI_MANIFEST, "digest": DIGEST, "size": 12}
BAD_DESCRIPTORS = [
    ([], "is not an object"),
    ("sha256:x", "is not an object"),
    ({**GOOD, "mediaType": None}, "no mediaType"),
    ({**GOOD, "mediaType": ""}, "no mediaType"),
    ({**GOOD, "digest": "sha512:" + "a" * 128}, "not sha256"),
    ({**GOOD, "digest": "sha256:../../etc/passwd"}, "not sha256"),
    ({**GOOD, "digest": DIGEST.upper()}, "not sha256"),
    ({**GOOD, "digest": 5}, "not sha256"),
    ({**GOOD, "size": -1}, "not a byte count"),
    ({**GOOD, "size": "12"}, "not a byte count"),
    ({**GOOD, "size": True}, "not a byte count"),
    ({**GOOD, "size": 1.5}, "not a byte count"),
]


@pytest.mark.parametrize(("obj", "message"), BAD_DESCRIPTORS)
def test_hostile_descriptors_are_refused(obj: Any, message: str) -> None:
    """Every descriptor field is type-checked; digests must match the sha256 pattern before use in URLs."""
    with pytest.raises(ManifestError, match=message):
        parse_descriptor(obj, "layer 0")


def test_good_descriptor_parses() -> None:
    """A well-formed descriptor becomes a Descriptor."""
    assert parse_descriptor(GOOD, "x") == Descriptor(OCI_MANIFEST, DIGEST, 12)


def _manifest(layer_type: str = "application/vnd.oci.image.layer.v1.tar+gzip", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": DIGEST, "size": 2},
        "layers": [{"mediaType": layer_type, "digest": OTHER, "size": 3}],
    }
    doc.update(extra)
    return doc


LAYER_TYPES = [
    ("application/vnd.oci.image.layer.v1.tar", None),
    ("application/vnd.oci.image.layer.v1.tar+gzip", None),
    ("application/vnd.docker.image.rootfs.diff.tar.gzip", None),
    ("application/vnd.oci.image.layer.v1.tar+zstd", "zstd layers are not supported"),
    ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", "non-distributable"),
    ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "non-distributable"),
    ("application/vnd.cncf.helm.chart.content.v1.tar+gzip", "want tar or tar\\+gzip"),
]


@pytest.mark.parametrize(("layer_type", "refusal"), LAYER_TYPES)
def test_layer_media_types(layer_type: str, refusal: str | None) -> None:
    """tar and tar+gzip layers pass; others are refused with a message naming the media type."""
    if refusal is None:
        assert parse_image_manifest(_manifest(layer_type))[1][0].media_type == layer_type
        return
    with pytest.raises(ManifestError, match=rf"layer 0 has media type {layer_type.replace('+', '[+]')}: {refusal}"):
        parse_image_manifest(_manifest(layer_type))


BAD_IMAGE_MANIFESTS = [
    (_manifest(layers="x"), "layers is not a list"),
    (_manifest(layers=[None]), "layer 0 is not an object"),
    (_manifest(config=None), "config is not an object"),
    (
        _manifest(config={"mediaType": "application/vnd.cncf.helm.config.v1+json", "digest": DIGEST, "size": 1}),
        "not a container image config",
    ),
]


@pytest.mark.parametrize(("doc", "message"), BAD_IMAGE_MANIFESTS)
def test_malformed_image_manifests(doc: dict[str, Any], message: str) -> None:
    """Wrong types in an image manifest are ManifestErrors."""
    with pytest.raises(ManifestError, match=message):
        parse_image_manifest(doc)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{", "not valid JSON"),
        (b"[1]", "not a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (b"null", "not a JSON object"),
    ],
)
def test_json_bodies_must_be_objects(body: bytes, message: str) -> None:
    """Manifests, configs and token answers must be JSON objects."""
    with pytest.raises(ManifestError, match=message):
        load_json_object(body, "the manifest")


def test_index_with_wrong_types() -> None:
    """An index whose manifests is not a list, or holds junk, is a ManifestError."""
    with pytest.raises(ManifestError, match="manifests is not a list"):
        parse_index({"manifests": {}})
    with pytest.raises(ManifestError, match="index entry 0 is not an object"):
        parse_index({"manifests": [3]})


# --- the client without a network ---------------------------------------------------------------


class NoNetwork(requests.Session):
    """A session that fails the test if anything is sent."""

    def request(self, *args: Any, **kwargs: Any) -> requests.Response:
        raise AssertionError(f"unexpected request {args} {kwargs}")


@pytest.mark.parametrize(
    "desc",
    [
        Descriptor(OCI_MANIFEST, "sha256:../../x", 1),
        Descriptor(OCI_MANIFEST, "md5:abc", 1),
        Descriptor(OCI_MANIFEST, DIGEST, -1),
    ],
)
def test_bad_descriptors_never_reach_the_network(tmp_path: Path, desc: Descriptor) -> None:
    """fetch_blob / fetch_config validate the descriptor before building a URL."""
    client = RegistryClient(session=NoNetwork())
    ref = Reference("reg.example", "a", "t")
    with pytest.raises(RegistryError, match=r"pull reg\.example/a:t"):
        client.fetch_blob(ref, desc, tmp_path / "blob")
    with pytest.raises(RegistryError):
        client.fetch_config(ref, desc)
    assert list(tmp_path.iterdir()) == []


def test_oversized_config_is_refused_before_download() -> None:
    """A config descriptor larger than the cap is refused without a request."""
    client = RegistryClient(session=NoNetwork())
    with pytest.raises(RegistryError, match=r"config sha256:.*more than the 4194304-byte limit"):
        client.fetch_config(Reference("reg.example", "a", "t"), Descriptor("x", DIGEST, 1 << 30))


# --- credentials --------------------------------------------------------------------------------


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


CREDENTIALS = [
    ({"auths": {"reg.example:5000": {"auth": b64("u:p")}}}, "reg.example:5000", ("u", "p")),
    ({"auths": {"reg.example": {"auth": b64("u:p:with:colons")}}}, "reg.example", ("u", "p:with:colons")),
    ({"auths": {"reg.example": {"username": "u", "password": "p"}}}, "reg.example", ("u", "p")),
    ({"auths": {"https://reg.example:5000": {"auth": b64("u:p")}}}, "reg.example:5000", ("u", "p")),
    ({"auths": {"https://reg.example/v1/": {"auth": b64("u:p")}}}, "reg.example", ("u", "p")),
    ({"auths": {"http://127.0.0.1:5000": {"auth": b64("u:p")}}}, "127.0.0.1:5000", ("u", "p")),
    ({"auths": {"Reg.Example": {"auth": b64("u:p")}}}, "reg.example", ("u", "p")),
    ({"auths": {"reg.example": {"auth": b64("u:p")}}}, "REG.example", ("u", "p")),
    ({"auths": {"reg.example:5000": {"auth": b64("u:p")}}}, "reg.example", None),  # port is part of the key
    ({"auths": {"reg.example": {}}}, "reg.example", None),  # secret held by a helper
    ({"auths": {}}, "reg.example", None),
    ({}, "reg.example", None),
]


@pytest.mark.parametrize(("doc", "registry", "expected"), CREDENTIALS)
def test_credentials_lookup(doc: dict[str, Any], registry: str, expected: tuple[str, str] | None) -> None:
    """auths entries (base64 auth or username/password, bare or URL keys) are found by host[:port]."""
    assert Credentials.parse(json.dumps(doc)).lookup(registry) == expected


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("reg.example", "reg.example"),
        ("reg.example:5000/v2/", "reg.example:5000"),
        ("https://reg.example:443", "reg.example:443"),
        ("ftp://reg.example", None),
        ("", None),
        ("user@reg.example", None),
        ("https://", None),
    ],
)
def test_registry_from_key(key: str, expected: str | None) -> None:
    """auths keys are reduced to host[:port]; odd keys are refused."""
    assert registry_from_key(key) == expected


MALFORMED = [
    ("{", None, "not valid JSON"),
    ("[]", None, "must be a JSON object"),
    ('{"auths": []}', "auths", "must be an object"),
    ('{"auths": {"reg.example": "x"}}', "auths.reg.example", "must be an object"),
    ('{"auths": {"reg.example": {"auth": "***"}}}', "auths.reg.example.auth", "cannot decode"),
    ('{"auths": {"reg.example": {"auth": "' + b64("nocolon") + '"}}}', "auths.reg.example.auth", "no user:password"),
    ('{"auths": {"reg.example": {"auth": 5}}}', "auths.reg.example.auth", "must be a string"),
    ('{"auths": {"reg.example": {"username": "u"}}}', "auths.reg.example", "username and password"),
    ('{"auths": {"ftp://x": {"auth": "eDp5"}}}', "auths.ftp://x", "not a registry host"),
    ('{"credHelpers": []}', "credHelpers", "must be an object"),
]


@pytest.mark.parametrize(("text", "key", "problem"), MALFORMED)
def test_malformed_credentials_name_file_and_key(tmp_path: Path, text: str, key: str | None, problem: str) -> None:
    """A malformed config.json is a ConfigError naming the file and the key."""
    path = tmp_path / "auth.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as info:
        Credentials.load(path)
    assert info.value.file == str(path)
    assert info.value.key == key


def test_missing_credentials_file_is_empty(tmp_path: Path) -> None:
    """No file means anonymous access, not an error."""
    creds = Credentials.load(tmp_path / "absent.json")
    assert creds.lookup("reg.example") is None
    assert creds.path == tmp_path / "absent.json"


def test_helpers_and_identity_tokens_are_read_as_docker_reads_them() -> None:
    """credHelpers for its registries, credsStore for the rest, auths otherwise; an identity token is a
    ("<token>", token) pair; registrytoken stays unsupported (listed, not fatal)."""
    doc = {
        "credsStore": "desktop",
        "credHelpers": {"reg.example": "ecr-login", "https://index.docker.io/v1/": "hub"},
        "auths": {"a.example": {"identitytoken": "tok"}, "b.example": {"auth": b64("u:p")},
                  "c.example": {"registrytoken": "x"}},
    }
    asked: list[tuple[str, str]] = []

    def run(program: str, server: str) -> tuple[int, str, str]:
        asked.append((program, server))
        return 0, json.dumps({"ServerURL": server, "Username": program[-4:], "Secret": "s"}), ""

    creds = replace(Credentials.parse(json.dumps(doc)), run=run)
    assert creds.unsupported_helpers == ("auths.c.example.registrytoken",)
    assert creds.lookup("reg.example") == ("ogin", "s")
    assert creds.lookup("docker.io") == ("-hub", "s")
    assert creds.lookup("b.example") == ("ktop", "s")  # credsStore holds every other registry, as in docker
    assert asked == [("docker-credential-ecr-login", "reg.example"),
                     ("docker-credential-hub", "https://index.docker.io/v1/"),
                     ("docker-credential-desktop", "b.example")]
    plain = Credentials.parse(json.dumps({"auths": doc["auths"]}))
    assert plain.lookup("a.example") == ("<token>", "tok")
    assert plain.lookup("b.example") == ("u", "p")


@pytest.mark.parametrize(("status", "out", "err", "raised"), [
    (1, "credentials not found in native keychain", "", None),
    (1, "", "boom", "exit 1: boom"),
    (0, "not json", "", "not JSON"),
    (0, '{"Username": "u"}', "", "no Username and Secret"),
    (0, '{"Username": "u", "Secret": 5}', "", "no Username and Secret"),
])
def test_a_helper_that_fails_or_answers_nonsense(status: int, out: str, err: str, raised: str | None) -> None:
    creds = replace(Credentials.parse('{"credsStore": "x"}'), run=lambda _p, _s: (status, out, err))
    if raised is None:
        assert creds.lookup("reg.example") is None
        return
    with pytest.raises(RegistryError, match=raised) as info:
        creds.lookup("reg.example")
    assert info.value.hint is not None and "docker-credential-x" in info.value.hint


def test_a_helper_answer_is_kept_a_while_and_dropped_when_refused() -> None:
    now = [0.0]
    calls: list[str] = []

    def run(_program: str, server: str) -> tuple[int, str, str]:
        calls.append(server)
        return 0, json.dumps({"Username": "u", "Secret": f"s{len(calls)}"}), ""

    creds = replace(Credentials.parse('{"credsStore": "x"}'), run=run, clock=lambda: now[0])
    assert creds.lookup("r.example") == ("u", "s1")
    now[0] = HELPER_CACHE_S - 1
    assert creds.lookup("r.example") == ("u", "s1")
    now[0] = HELPER_CACHE_S + 1
    assert creds.lookup("r.example") == ("u", "s2")
    creds.forget("R.example")
    assert creds.lookup("r.example") == ("u", "s3")


@pytest.mark.parametrize("doc", ['{"credsStore": "../../bin/sh"}', '{"credsStore": 5}',
                                 '{"credHelpers": {"reg.example": "a b"}}', '{"credHelpers": {"reg.example": ""}}'])
def test_helper_names_that_are_no_program_name_are_refused(doc: str) -> None:
    with pytest.raises(ConfigError, match="not a helper name"):
        Credentials.parse(doc)


def test_credentials_repr_hides_passwords(tmp_path: Path) -> None:
    """Passwords never show in repr() (which ends up in logs and tracebacks)."""
    path = tmp_path / "auth.json"
    path.write_text(json.dumps({"auths": {"reg.example": {"username": "u", "password": "hunter2"}}}))
    creds = Credentials.load(path)
    assert "hunter2" not in repr(creds)
    assert creds.describe("reg.example") == f'"auths" -> "reg.example" in {path} (image.auth_file)'
