"""TLS trust for registries: the host's own CA store plus image.ca_file, and nothing else.

requests verifies against certifi's bundle by default (and lets REQUESTS_CA_BUNDLE replace
it); an agent that loads kernel modules from what it downloads must trust what the host's
administrator trusts. The adapter below hands urllib3 one SSLContext built from the host's
bundle (found under the host root, so `--root /host` reads the host's, not the container's)
and stops requests from loading any other CA file into it. requests is imported only when a
session is made: checking the configuration costs no HTTP stack.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.errors import ConfigError
from agent.hostroot import HostRoot

if TYPE_CHECKING:
    import requests

# Where distributions keep their CA bundle (the same list Go's crypto/x509 searches).
HOST_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Flatcar, Gentoo, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL, Fedora/RHEL CoreOS
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",  # RHEL / CentOS 7+
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/pki/tls/cacert.pem",  # OpenELEC
    "/etc/ssl/cert.pem",  # Alpine
)


def host_bundle(host: HostRoot) -> Path | None:
    """The host's CA bundle, if it has one of the usual ones."""
    for candidate in HOST_BUNDLES:
        path = host(candidate)
        if path.is_file():
            return path
    return None


def trust_context(host: HostRoot, ca_file: str = "") -> ssl.SSLContext:
    """Verify servers against the host's CA bundle and the operator's extra CA file.

    A host without a bundle falls back to certifi's (requests' own), so a minimal host still
    reaches public registries. A configured ca_file that cannot be read is a ConfigError.
    """
    bundle = host_bundle(host)
    if bundle is None:
        import certifi  # noqa: PLC0415 - only on a host without a CA store

        bundle = Path(certifi.where())
    try:
        context = ssl.create_default_context(cafile=str(bundle))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(str(bundle), None, f"the host's CA bundle cannot be loaded: {exc}",
                          "a PEM file of CA certificates (update-ca-certificates rebuilds it)") from None
    if ca_file:
        _load_ca_file(context, host, ca_file)
    return context


def check_ca_file(host: HostRoot, ca_file: str) -> None:
    """ConfigError unless image.ca_file loads: at start, before any connection needs it."""
    _load_ca_file(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), host, ca_file)


def _load_ca_file(context: ssl.SSLContext, host: HostRoot, ca_file: str) -> None:
    try:
        context.load_verify_locations(cafile=str(host(ca_file)))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(ca_file, "image.ca_file", f"cannot load CA certificates: {exc}",
                          "a PEM file of CA certificates") from None


def session_for(context: ssl.SSLContext) -> requests.Session:
    """A requests session whose https is verified by `context` alone."""
    import requests  # noqa: PLC0415 - see the module's docstring
    from requests.adapters import HTTPAdapter  # noqa: PLC0415

    class ContextAdapter(HTTPAdapter):
        """https verified by `context` alone: not certifi, not REQUESTS_CA_BUNDLE, not verify=<path>."""

        def __init__(self, context: ssl.SSLContext) -> None:
            self._context = context
            super().__init__()  # calls init_poolmanager: the context must be set first

        def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
            kwargs["ssl_context"] = self._context
            super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
            kwargs["ssl_context"] = self._context
            return super().proxy_manager_for(proxy, **kwargs)

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            super().cert_verify(conn, url, verify, cert)  # type: ignore[no-untyped-call]
            conn.ca_certs = conn.ca_cert_dir = None  # else urllib3 loads them into our context

    session = requests.Session()
    session.mount("https://", ContextAdapter(context))
    return session
