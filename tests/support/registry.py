"""A real registry for tests: Debian's docker-registry on 127.0.0.1, optional auth and TLS, and hand-pushed images.

Load it in tests/conftest.py with `pytest_plugins = ["support.registry"]` for the
session-scoped `registry_server` fixture (plain http, no auth), or start a `RegistryServer`
yourself for basic (`htpasswd=`) or bearer token (`token=TokenServer(...)`) auth, or for
https with a throwaway CA (`tls=True`, trust `server.ca_file`). Pushes go
through `Pusher`, which does its own small auth handshake with the server's admin login, so
the code under test is never used to build what it is tested against.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import io
import ipaddress
import json
import re
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urljoin, urlsplit

import pytest
import requests

from agent import subp

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

READY_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
HTTP_TIMEOUT_S = 30.0
UPLOAD_CHUNK_BYTES = 1024 * 1024
ADMIN = ("admin", "admin-secret")
TOKEN_SERVICE = "test-registry"
TOKEN_ISSUER = "test-token-issuer"
TOKEN_TTL_S = 300
TLS_VALID_S = 2 * 24 * 3600
KEY_USAGES = (  # every keyword of cryptography's x509.KeyUsage, in its order
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- bearer tokens ------------------------------------------------------------------------------


class TokenServer:
    """A loopback token realm issuing RS256 JWTs the registry trusts through an x5c cert chain.

    `users` maps user -> password (checked with Basic auth); `anonymous_pull` grants pull
    scopes without a login. Every request is recorded in `requests` as (user or None, scope).
    """

    def __init__(self, users: Mapping[str, str], *, anonymous_pull: bool = False) -> None:
        from cryptography import x509  # noqa: PLC0415 - only token tests need cryptography
        from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 - only token tests need cryptography
        from cryptography.hazmat.primitives.asymmetric import rsa  # noqa: PLC0415 - only token tests need cryptography
        from cryptography.x509.oid import NameOID  # noqa: PLC0415 - only token tests need cryptography

        self.users = dict(users)
        self.anonymous_pull = anonymous_pull
        self.requests: list[tuple[str | None, str]] = []
        self.refresh_tokens: dict[str, str] = {}  # OAuth2 refresh (docker's identity) token -> user
        self.posts: list[dict[str, list[str]]] = []  # the forms of the refresh-token requests
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test token signer")])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._cert_der_b64 = base64.b64encode(cert.public_bytes(serialization.Encoding.DER)).decode("ascii")
        self._hashes = hashes
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self._server.server_address[1]}"

    @property
    def realm(self) -> str:
        return f"http://{self.host}/token"

    def start(self) -> TokenServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def issue(self, subject: str, access: list[dict[str, Any]], *, ttl_s: int = TOKEN_TTL_S) -> str:
        """A signed JWT for `access` ([{type, name, actions}]), as distribution's token auth expects."""
        from cryptography.hazmat.primitives.asymmetric import padding  # noqa: PLC0415 - only token tests need cryptography

        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._cert_der_b64]}
        claims = {
            "iss": TOKEN_ISSUER,
            "sub": subject,
            "aud": TOKEN_SERVICE,
            "exp": now + ttl_s,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), self._hashes.SHA256())
        return f"{signing_input}.{b64url(signature)}"

    def _grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            wanted = [a for a in actions.split(",") if a]
            allowed = wanted if user is not None else [a for a in wanted if a == "pull" and self.anonymous_pull]
            if kind == "repository" and name and allowed:
                access.append({"type": kind, "name": name, "actions": allowed})
        return access

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                ok, user = _basic_user(self.headers.get("Authorization"), server.users)
                scopes = query.get("scope", [])
                server.requests.append((user, " ".join(scopes)))
                if not ok or (user is None and not server.anonymous_pull):
                    self._answer(401, {"details": "bad or missing credentials"}, challenge=True)
                    return
                if query.get("service") != [TOKEN_SERVICE]:
                    self._answer(400, {"details": "unknown service"})
                    return
                token = server.issue(user or "", server._grant(user, scopes))
                self._answer(200, {"token": token, "access_token": token, "expires_in": TOKEN_TTL_S})

            def do_POST(self) -> None:
                """distribution's OAuth2 token endpoint (docs/spec/auth/oauth.md), refresh_token grant only."""
                length = int(self.headers.get("Content-Length") or 0)
                form = parse_qs(self.rfile.read(length).decode())
                server.posts.append(form)
                user = server.refresh_tokens.get(form.get("refresh_token", [""])[0])
                if form.get("grant_type") != ["refresh_token"] or not form.get("client_id") or user is None:
                    self._answer(400, {"error": "invalid_grant"})
                    return
                if form.get("service") != [TOKEN_SERVICE]:
                    self._answer(400, {"error": "invalid_request", "error_description": "unknown service"})
                    return
                scopes = " ".join(form.get("scope", [])).split()
                token = server.issue(user, server._grant(user, scopes))
                self._answer(200, {"access_token": token, "expires_in": TOKEN_TTL_S, "scope": " ".join(scopes)})

            def _answer(self, status: int, body: dict[str, Any], *, challenge: bool = False) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if challenge:
                    self.send_header("WWW-Authenticate", 'Basic realm="token"')
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


def _basic_user(header: str | None, users: Mapping[str, str]) -> tuple[bool, str | None]:
    """(login ok, user) for a Basic header: (True, None) without one, (False, None) for a wrong one."""
    if not header:
        return True, None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return False, None
    try:
        user, _, password = base64.b64decode(value).decode().partition(":")
    except ValueError:
        return False, None
    if user in users and secrets.compare_digest(users[user], password):
        return True, user
    return False, None


# --- TLS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a throwaway CA and of a server certificate it signed (unencrypted key)."""

    ca_file: Path
    cert_file: Path
    key_file: Path


def make_tls_files(directory: Path) -> TlsFiles:
    """Write ca.pem, server.pem and server-key.pem into `directory`: a fresh CA, and a server
    certificate it signed for 127.0.0.1 (IP SAN) and localhost (DNS SAN).

    Each call makes a new CA, so two calls give two CAs that do not trust each other. The
    extensions satisfy strict X.509 checks (key usages, subject and authority key ids).
    """
    from cryptography import x509  # noqa: PLC0415 - only TLS and token tests need cryptography
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415 - as above
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415 - as above

    now = dt.datetime.now(dt.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, f"nvidia-agent test CA {uuid.uuid4().hex[:8]}")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())

    def builder(subject: x509.Name, key: ec.EllipticCurvePrivateKey) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(seconds=TLS_VALID_S))
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        )

    def key_usage(*allowed: str) -> x509.KeyUsage:
        return x509.KeyUsage(**{usage: usage in allowed for usage in KEY_USAGES})

    ca = (
        builder(ca_name, ca_key)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(key_usage("key_cert_sign", "crl_sign"), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        builder(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "127.0.0.1")]), server_key)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage("digital_signature"), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.pem", directory / "server.pem", directory / "server-key.pem")
    files.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert_file.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files.key_file.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return files


# --- the registry -------------------------------------------------------------------------------


class RegistryServer:
    """Debian's `docker-registry serve` on 127.0.0.1:<free port> with its own storage under `root`.

    `htpasswd` turns on basic auth for those users (plus the admin); `token` turns on bearer
    token auth against that TokenServer (which must know the admin). `tls` serves https with a
    certificate from a throwaway CA made under `root/tls`; clients trust it through `ca_file`
    (`verify` is what to hand to requests either way). Stopped by PID on exit.
    """

    def __init__(
        self,
        root: Path,
        *,
        htpasswd: Mapping[str, str] | None = None,
        token: TokenServer | None = None,
        tls: bool = False,
    ) -> None:
        if shutil.which("docker-registry") is None:
            pytest.skip("needs docker-registry (apt: docker-registry)")
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"{'https' if tls else 'http'}://{self.host}"
        self.ca_file: Path | None = None
        self.admin: tuple[str, str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        listen = f"addr: {self.host}"
        if tls:
            files = make_tls_files(root / "tls")
            self.ca_file = files.ca_file
            listen += f", tls: {{certificate: {files.cert_file}, key: {files.key_file}}}"
        auth = ""
        if htpasswd is not None:
            self.admin = ADMIN
            lines = [_bcrypt_line(user, password) for user, password in {**htpasswd, ADMIN[0]: ADMIN[1]}.items()]
            (root / "htpasswd").write_text("".join(lines))
            auth = f"auth: {{htpasswd: {{realm: {TOKEN_SERVICE}, path: {root / 'htpasswd'}}}}}\n"
        elif token is not None:
            self.admin = ADMIN
            token.users.setdefault(*ADMIN)
            (root / "token-ca.pem").write_bytes(token.cert_pem)
            auth = (
                f"auth: {{token: {{realm: {token.realm}, service: {TOKEN_SERVICE}, "
                f"issuer: {TOKEN_ISSUER}, rootcertbundle: {root / 'token-ca.pem'}}}}}\n"
            )
        (root / "config.yml").write_text(
            "version: 0.1\n"
            "log: {level: warn, accesslog: {disabled: true}}\n"
            f"storage: {{filesystem: {{rootdirectory: {root / 'data'}}}, delete: {{enabled: true}}}}\n"
            f"http: {{{listen}}}\n" + auth
        )
        self.pusher = Pusher(self.url, self.admin, verify=self.verify)

    @property
    def verify(self) -> str | bool:
        """requests' `verify=` for this server: the CA file under TLS, else the default."""
        return str(self.ca_file) if self.ca_file is not None else True

    def start(self) -> RegistryServer:
        log = (self.root / "registry.log").open("wb")
        with log:
            self._proc = subprocess.Popen(
                ["docker-registry", "serve", str(self.root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + READY_TIMEOUT_S
        last: requests.ConnectionError | None = None
        while True:
            try:
                if requests.get(f"{self.url}/v2/", timeout=1, verify=self.verify).status_code in (200, 401):
                    return self
            except requests.ConnectionError as exc:  # an SSLError too, so a TLS mistake shows below
                last = exc
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start (last probe: {last!r}):\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def log(self) -> str:
        path = self.root / "registry.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> RegistryServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _bcrypt_line(user: str, password: str) -> str:
    if shutil.which("htpasswd") is None:
        pytest.skip("needs htpasswd (apt: apache2-utils)")
    return subp.run(["htpasswd", "-Bbn", user, password]).stdout.strip() + "\n"


@pytest.fixture(scope="session", name="registry_server")
def registry_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A plain-http registry without auth on 127.0.0.1 for the whole session; use unique repos per test."""
    with RegistryServer(tmp_path_factory.mktemp("registry")) as server:
        yield server


# --- pushing ------------------------------------------------------------------------------------


class Pusher:
    """Pushes blobs and manifests with plain requests, logging in as `admin` when challenged.

    `verify` is requests' `verify=`: a CA file path for a TLS registry with a throwaway CA.
    """

    def __init__(self, url: str, admin: tuple[str, str] | None, *, verify: str | bool = True) -> None:
        self.url = url
        self.admin = admin
        self._authorization: dict[str, str] = {}  # repo -> header value
        self._session = requests.Session()
        self._session.trust_env = False  # also keeps REQUESTS_CA_BUNDLE from overriding `verify`
        self._session.verify = verify

    def _send(self, method: str, url: str, repo: str, **kwargs: Any) -> requests.Response:
        headers = dict(kwargs.pop("headers", {}))
        if repo in self._authorization:
            headers["Authorization"] = self._authorization[repo]
        resp = self._session.request(method, url, headers=headers, timeout=HTTP_TIMEOUT_S, **kwargs)
        if resp.status_code == 401 and self.admin is not None and "Authorization" not in headers:
            self._authorization[repo] = self._login(resp.headers.get("WWW-Authenticate", ""))
            headers["Authorization"] = self._authorization[repo]
            resp = self._session.request(method, url, headers=headers, timeout=HTTP_TIMEOUT_S, **kwargs)
        if resp.status_code >= 400:
            raise RuntimeError(f"{method} {url}: HTTP {resp.status_code} {resp.text[:500]}")
        return resp

    def _login(self, challenge: str) -> str:
        assert self.admin is not None
        basic = "Basic " + base64.b64encode(f"{self.admin[0]}:{self.admin[1]}".encode()).decode()
        if challenge.lower().startswith("basic"):
            return basic
        params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
        query = urlencode({"service": params.get("service", ""), "scope": params.get("scope", "")})
        resp = requests.get(f"{params['realm']}?{query}", headers={"Authorization": basic}, timeout=HTTP_TIMEOUT_S)
        resp.raise_for_status()
        return f"Bearer {resp.json()['token']!s}"

    def _start_upload(self, repo: str) -> str:
        resp = self._send("POST", f"{self.url}/v2/{repo}/blobs/uploads/", repo)
        return urljoin(f"{self.url}/", resp.headers["Location"])

    def _put_blob(self, repo: str, digest: str, data: bytes | Iterable[bytes]) -> None:
        """A monolithic upload: POST for a location, then PUT the content with its digest."""
        location = self._start_upload(repo)
        sep = "&" if "?" in location else "?"
        self._send("PUT", f"{location}{sep}digest={digest}", repo, data=data,
                   headers={"Content-Type": "application/octet-stream"})

    def push_blob(self, repo: str, data: bytes) -> str:
        """Upload `data` monolithically; returns its digest."""
        digest = sha256_digest(data)
        self._put_blob(repo, digest, data)
        return digest

    def push_blob_stream(self, repo: str, chunks: Callable[[], Iterable[bytes]]) -> tuple[str, int]:
        """Upload a large blob from a generator (called twice: once to hash, once to send)."""
        hasher, size = hashlib.sha256(), 0
        for chunk in chunks():
            hasher.update(chunk)
            size += len(chunk)
        digest = "sha256:" + hasher.hexdigest()
        self._put_blob(repo, digest, iter(chunks()))
        return digest, size

    def push_manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        """PUT a manifest under a tag (or digest); returns the digest of `body`."""
        self._send(
            "PUT", f"{self.url}/v2/{repo}/manifests/{ref}", repo, data=body, headers={"Content-Type": media_type}
        )
        return sha256_digest(body)


# --- images -------------------------------------------------------------------------------------


def tar_layer(files: Mapping[str, bytes], *, compress: bool = True) -> bytes:
    """A layer tarball of regular files (deterministic: fixed mtime, gzip without a timestamp)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0) if compress else raw.getvalue()


@dataclass(frozen=True)
class PushedImage:
    """What a push produced: the manifest (digest, size, media type, body) and its blobs."""

    repo: str
    digest: str
    size: int
    media_type: str
    body: bytes
    config: dict[str, Any]
    layers: tuple[dict[str, Any], ...] = field(default=())

    def descriptor(self, platform: tuple[str, str, str | None] | None = None) -> dict[str, Any]:
        """This manifest as an index entry, with a platform (os, arch, variant) if given."""
        entry: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if platform is not None:
            os_name, arch, variant = platform
            entry["platform"] = {"os": os_name, "architecture": arch} | ({"variant": variant} if variant else {})
        return entry


def push_image(
    pusher: Pusher,
    repo: str,
    tag: str,
    layers: Iterable[bytes] = (),
    *,
    fmt: str = "oci",
    arch: str = "amd64",
    variant: str | None = None,
    layer_media_type: str | None = None,
    layer_descriptors: Iterable[dict[str, Any]] = (),
) -> PushedImage:
    """Push one single-platform image (fmt "oci" or "docker") built from layer blobs.

    `layer_descriptors` are appended as given (to refer to blobs with a wrong size, odd media types).
    """
    oci = fmt == "oci"
    layer_type = layer_media_type or (OCI_LAYER_GZIP if oci else DOCKER_LAYER_GZIP)
    descs = [{"mediaType": layer_type, "digest": pusher.push_blob(repo, blob), "size": len(blob)} for blob in layers]
    descs.extend(layer_descriptors)
    config: dict[str, Any] = {
        "architecture": arch,
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in descs]},
        "config": {},
    }
    if variant:
        config["variant"] = variant
    config_body = json.dumps(config, sort_keys=True).encode()
    manifest_type = OCI_MANIFEST if oci else DOCKER_MANIFEST
    manifest = {
        "schemaVersion": 2,
        "mediaType": manifest_type,
        "config": {
            "mediaType": OCI_CONFIG if oci else DOCKER_CONFIG,
            "digest": pusher.push_blob(repo, config_body),
            "size": len(config_body),
        },
        "layers": descs,
    }
    body = json.dumps(manifest, indent=2).encode()
    digest = pusher.push_manifest(repo, tag, body, manifest_type)
    return PushedImage(repo, digest, len(body), manifest_type, body, config, tuple(descs))


def push_index(
    pusher: Pusher,
    repo: str,
    tag: str,
    entries: Iterable[dict[str, Any]],
    *,
    fmt: str = "oci",
) -> PushedImage:
    """Push an OCI index (or Docker manifest list, fmt "docker") over the given entries."""
    media_type = OCI_INDEX if fmt == "oci" else DOCKER_LIST
    index = {"schemaVersion": 2, "mediaType": media_type, "manifests": list(entries)}
    body = json.dumps(index, indent=2).encode()
    digest = pusher.push_manifest(repo, tag, body, media_type)
    return PushedImage(repo, digest, len(body), media_type, body, {})
