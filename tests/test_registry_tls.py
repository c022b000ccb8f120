"""The test registry over https: a throwaway CA, the server it certifies, and pushes through it."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from support.registry import OCI_MANIFEST, RegistryServer, make_tls_files, push_image, tar_layer

pytestmark = pytest.mark.integration

TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def tls_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    with RegistryServer(tmp_path_factory.mktemp("tls-registry"), tls=True) as server:
        yield server


def get(url: str, verify: str | bool, headers: dict[str, str] | None = None) -> requests.Response:
    """A GET that ignores REQUESTS_CA_BUNDLE and proxies from the environment, so `verify` alone decides."""
    with requests.Session() as session:
        session.trust_env = False
        return session.get(url, verify=verify, headers=headers, timeout=TIMEOUT_S)


def test_https_with_the_ca_file_reaches_the_registry(tls_registry: RegistryServer) -> None:
    """With its CA file, https to 127.0.0.1:<port> (IP SAN) and localhost:<port> (DNS SAN) verifies."""
    assert tls_registry.ca_file is not None
    assert tls_registry.host == f"127.0.0.1:{tls_registry.port}"
    assert tls_registry.url == f"https://{tls_registry.host}"
    for host in (tls_registry.host, f"localhost:{tls_registry.port}"):
        resp = get(f"https://{host}/v2/", str(tls_registry.ca_file))
        assert resp.status_code in (200, 401), host


def test_https_without_the_ca_fails_verification(tls_registry: RegistryServer) -> None:
    """Without the CA (requests' default trust) the server's certificate does not verify."""
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(f"https://{tls_registry.host}/v2/", True)


def test_https_with_another_ca_fails_verification(tls_registry: RegistryServer, tmp_path: Path) -> None:
    """A different throwaway CA from the same helper does not vouch for this server."""
    other = make_tls_files(tmp_path / "other")
    with pytest.raises(requests.exceptions.SSLError, match="CERTIFICATE_VERIFY_FAILED"):
        get(f"https://{tls_registry.host}/v2/", str(other.ca_file))


def test_ca_and_certificate_pass_strict_x509_checks(tls_registry: RegistryServer) -> None:
    """The chain also verifies with OpenSSL's strict X.509 checks, the default for ssl contexts in Python 3.13."""
    assert tls_registry.ca_file is not None
    context = ssl.create_default_context(cafile=tls_registry.ca_file)
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    with (
        socket.create_connection(("127.0.0.1", tls_registry.port), timeout=TIMEOUT_S) as sock,
        context.wrap_socket(sock, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.getpeercert() is not None


def test_plain_http_to_the_tls_port_is_refused(tls_registry: RegistryServer) -> None:
    """Plain http to the https port gets Go's 400 answer, never the registry API."""
    resp = get(f"http://{tls_registry.host}/v2/", True)
    assert resp.status_code == 400
    assert "HTTP request to an HTTPS server" in resp.text
    assert "Docker-Distribution-Api-Version" not in resp.headers


def test_push_over_https_and_read_the_manifest_back(tls_registry: RegistryServer) -> None:
    """The server's Pusher pushes over https with the CA, and the manifest and layer read back by digest."""
    assert tls_registry.ca_file is not None
    layer = tar_layer({"hello.txt": b"over tls\n"})
    image = push_image(tls_registry.pusher, "tls/probe", "v1", [layer])
    base = f"https://{tls_registry.host}/v2/tls/probe"

    resp = get(f"{base}/manifests/v1", str(tls_registry.ca_file), headers={"Accept": OCI_MANIFEST})
    assert resp.status_code == 200
    assert resp.content == image.body
    assert resp.headers["Docker-Content-Digest"] == image.digest

    blob = get(f"{base}/blobs/{image.layers[0]['digest']}", str(tls_registry.ca_file))
    assert blob.status_code == 200
    assert blob.content == layer
