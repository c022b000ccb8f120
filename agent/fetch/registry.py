"""The registry source: resolve and download images over the OCI distribution API (plain HTTP(S), no engine)."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import time
from base64 import b64encode
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode, urljoin, urlsplit

import requests
import structlog
import tenacity
import urllib3

from agent import failpoints
from agent.credentials import IDENTITY_TOKEN_USER, Credentials
from agent.errors import (
    AgentError,
    Cancelled,
    DigestMismatch,
    HostError,
    ImageMissing,
    RegistryError,
    RegistryUnavailable,
)
from agent.fetch.auth import Challenge, parse_retry_after, parse_www_authenticate
from agent.fetch.manifest import (
    CONFIG_MAX_BYTES,
    MANIFEST_ACCEPT,
    MANIFEST_MAX_BYTES,
    Descriptor,
    ManifestError,
    Platform,
    ResolvedImage,
    check_blob,
    config_platform,
    load_json_object,
    manifest_media_type,
    resolve_manifest,
    sha256_digest,
)
from agent.reference import DIGEST_RE, TAG_RE, Reference, endpoint

log = structlog.get_logger(__name__)

TOKEN_MAX_BYTES = 1024 * 1024
ERROR_BODY_MAX_BYTES = 64 * 1024
CHUNK_BYTES = 256 * 1024  # a blob is read in pieces this size; a broken connection loses at most one
READ_BYTES = 64 * 1024
MAX_REDIRECTS = 5
BACKOFF_BASE_S = 1.0
TOKEN_DEFAULT_TTL_S = 60.0  # what the distribution token spec says to assume
TOKEN_EXPIRY_MARGIN_S = 5.0
CONFIG_CACHE_ENTRIES = 16

_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MISSING_HINT = (
    "no image tagged {tag} in {name}; push one built for this host or check image.repository / image.tag_template"
)
_T = TypeVar("_T")


class _Busy(RegistryUnavailable):
    """The registry asked us to come back later (429/5xx), maybe saying when."""

    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s




# --- the client ----------------------------------------------------------------------------


@dataclass
class _Token:
    value: str
    expires_at_s: float  # time.monotonic()


def _keep_headers(request: requests.PreparedRequest) -> requests.PreparedRequest:
    """Explicit no-op auth: stops requests from adding ~/.netrc credentials over ours."""
    return request


class RegistryClient:
    """Talks the OCI distribution API to registries: manifests, blobs, auth, retries.

    Transient failures (connection, timeout, 5xx, 429) are retried up to
    `attempts` times with exponential backoff capped at `backoff_max_s`;
    nothing else is retried.
    """

    def __init__(
        self,
        *,
        plain_http: Collection[str] = (),
        credentials: Credentials | None = None,
        timeout_s: float = 30.0,
        attempts: int = 5,
        backoff_max_s: float = 30.0,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._plain_http = frozenset(plain_http)
        self._credentials = credentials if credentials is not None else Credentials()
        self._timeout_s = timeout_s
        self._attempts = max(1, attempts)
        self._backoff_max_s = backoff_max_s
        self._session = session if session is not None else requests.Session()
        self._sleep = sleep
        self._tokens: dict[tuple[str, str], _Token] = {}
        self._basic: set[str] = set()  # registries that asked for Basic auth
        self._configs: dict[str, dict[str, Any]] = {}

    # --- public API ---

    def resolve(self, ref: Reference, platform: Platform) -> ResolvedImage:
        """Resolve `ref` to the single-platform manifest for `platform`, following an index."""
        what = f"resolve {ref}"
        if ref.digest:
            missing = f"{ref.name} has no manifest {ref.digest}; check the pinned digest"
        else:
            missing = _MISSING_HINT.format(tag=ref.tag, name=ref.name)
        resolved = resolve_manifest(ref, platform, lambda selector, hint: self._get_manifest(ref, selector, what, hint),
                                    what, missing)
        index_digest, digest, layers = resolved.index_digest, resolved.reference.digest, resolved.layers
        if index_digest is None:
            self._check_platform(resolved, platform, what)
        log.debug("image_resolved", ref=str(ref), digest=digest, index_digest=index_digest, layers=len(layers))
        return resolved

    def fetch_blob(
        self,
        ref: Reference,
        desc: Descriptor,
        dest: Path,
        *,
        cancelled: Callable[[], bool] = lambda: False,
    ) -> None:
        """Download a blob to `dest`, verified: streamed into `dest.partial`, renamed only if it matches.

        A `.partial` left by an interrupted download (a dropped connection, a stop, a crash) is
        resumed with an HTTP Range request. Content that does not match its digest is
        downloaded once more from the start (a byte flipped in transit), then refused with
        DigestMismatch. Raises Cancelled when `cancelled()` turns true (the partial file stays
        for the next attempt), HostError when the local disk refuses.
        """
        what = f"pull {ref}: blob {desc.digest}"
        self._check_descriptor(desc, what)
        partial = dest.with_name(dest.name + ".partial")
        url = self._url(ref, f"blobs/{desc.digest}")
        missing = f"{ref.name} lacks blob {desc.digest}; push the image again"

        def attempt() -> str:
            if cancelled():
                raise Cancelled(f"{what}: cancelled")
            try:
                return self._download(ref, url, desc, partial, what=what, missing=missing, cancelled=cancelled)
            except OSError as exc:  # network errors arrive as AgentErrors; this is the local disk
                partial.unlink(missing_ok=True)
                raise HostError(f"{what}: cannot write {partial}: {exc.strerror or exc}") from exc

        for tries_left in (1, 0):
            try:
                digest = self._retrying(what, attempt)
                check_blob(partial.stat().st_size, digest, desc, what)
            except (RegistryUnavailable, Cancelled):
                raise  # the partial download stays: the next attempt resumes it
            except DigestMismatch as exc:
                partial.unlink(missing_ok=True)
                if not tries_left:
                    raise
                log.warning("blob_refetch", blob=desc.digest, error=exc.message, detail="downloading it once more")
                continue
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            partial.replace(dest)
            failpoints.hit("fetch.complete")
            return

    def _download(self, ref: Reference, url: str, desc: Descriptor, partial: Path, *, what: str, missing: str,
                  cancelled: Callable[[], bool]) -> str:
        """Bring `partial` to the blob's full size (resume what is there, or start over); its digest."""
        have = partial.stat().st_size if partial.is_file() else 0
        if have > desc.size:
            partial.unlink()
            have = 0
        digest = hashlib.sha256()
        if have:
            with partial.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    digest.update(chunk)
        if have == desc.size:
            return "sha256:" + digest.hexdigest()
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        with self._open(ref, url, what, headers, missing) as resp:
            if have and resp.status_code == 206:
                expected = f"bytes {have}-{desc.size - 1}/{desc.size}"
                if resp.headers.get("Content-Range", "") != expected:
                    raise DigestMismatch(f"{what}: asked for bytes {have}- and got "
                                         f"{resp.headers.get('Content-Range')!r}, not {expected!r}")
                log.info("blob_resumed", blob=desc.digest, offset=have, size=desc.size)
            else:
                have = 0  # the registry ignored the Range header: start over
                digest = hashlib.sha256()
            self._stream_to_file(resp, desc, partial, offset=have, digest=digest, what=what, cancelled=cancelled)
        return "sha256:" + digest.hexdigest()

    def fetch_config(self, ref: Reference, desc: Descriptor) -> dict[str, Any]:
        """Fetch and verify a small JSON blob (the image config); size-capped, digest-checked."""
        what = f"pull {ref}: config {desc.digest}"
        cached = self._configs.get(desc.digest)
        if cached is not None:
            return copy.deepcopy(cached)
        body = self.fetch_small(ref, desc, CONFIG_MAX_BYTES, what)
        try:
            doc = load_json_object(body, "the config")
        except ManifestError as exc:
            raise RegistryError(f"{what}: {exc}") from exc
        if len(self._configs) >= CONFIG_CACHE_ENTRIES:
            self._configs.pop(next(iter(self._configs)))
        self._configs[desc.digest] = doc
        return copy.deepcopy(doc)

    def fetch_small(self, ref: Reference, desc: Descriptor, limit: int, what: str) -> bytes:
        """A small blob (a config, a signature payload) in memory: at most `limit` bytes, checked (check_blob)."""
        self._check_descriptor(desc, what)
        if desc.size > limit:
            raise RegistryError(f"{what}: {desc.size} bytes is more than the {limit}-byte limit")
        url = self._url(ref, f"blobs/{desc.digest}")
        missing = f"{ref.name} lacks blob {desc.digest}; push the image again"

        def attempt() -> bytes:
            with self._open(ref, url, what, {}, missing) as resp:
                return self._read_capped(resp, desc.size, what, digest_bound=True)

        body = self._retrying(what, attempt)
        check_blob(len(body), sha256_digest(body), desc, what)
        return body

    def manifest(self, ref: Reference, what: str) -> tuple[str, str, dict[str, Any]]:
        """The manifest `ref` names, as it is (no index followed): (digest, media type, document)."""
        return self._get_manifest(ref, ref.selector, what, f"{ref.name} has no {ref.selector}")

    # --- manifests ---

    def _get_manifest(self, ref: Reference, selector: str, what: str, missing: str) -> tuple[str, str, dict[str, Any]]:
        """Fetch a manifest by tag or digest: (computed digest, media type, document)."""
        by_digest = selector.startswith("sha256:")
        if not (DIGEST_RE.match(selector) if by_digest else TAG_RE.match(selector)):
            raise RegistryError(f"{what}: invalid tag or digest {selector!r}")
        url = self._url(ref, f"manifests/{selector}")

        def attempt() -> tuple[bytes, str]:
            with self._open(ref, url, what, {"Accept": MANIFEST_ACCEPT}, missing) as resp:
                body = self._read_capped(resp, MANIFEST_MAX_BYTES, what)
                return body, resp.headers.get("Content-Type", "")

        body, content_type = self._retrying(what, attempt)
        digest = sha256_digest(body)
        if by_digest and digest != selector:
            raise DigestMismatch(
                f"{what}: manifest {selector} came back with digest {digest}",
                hint="the registry or something in between serves other content than it names",
            )
        try:
            doc = load_json_object(body, f"manifest {digest}")
            media_type = manifest_media_type(doc, content_type)
        except ManifestError as exc:
            raise RegistryError(f"{what}: {exc}", hint=exc.hint) from exc
        return digest, media_type, doc

    def _check_platform(self, resolved: ResolvedImage, want: Platform, what: str) -> None:
        """A single-platform manifest carries its platform in the config: refuse another one."""
        config = self.fetch_config(resolved.reference, resolved.config)
        have = config_platform(config)
        if have is not None and not want.matches(have):
            raise RegistryError(
                f"{what}: the image is built for {have}, not {want}",
                hint=f"push an image built for {want}",
            )

    # --- blobs ---

    def _stream_to_file(
        self,
        resp: requests.Response,
        desc: Descriptor,
        partial: Path,
        *,
        offset: int,
        digest: Any,
        what: str,
        cancelled: Callable[[], bool],
    ) -> None:
        """Write the body to `partial` from `offset` on, refusing more bytes than the descriptor gives."""
        want = desc.size - offset
        announced = _content_length(resp)
        if announced is not None and announced != want:
            raise DigestMismatch(
                f"{what}: the registry sends {announced} bytes, the descriptor leaves {want}",
                hint="the image is corrupt or was tampered with; it was not used",
            )
        got = 0
        with partial.open("r+b" if offset else "wb") as out:
            out.truncate(offset)
            out.seek(offset)
            for chunk in self._chunks(resp, CHUNK_BYTES, what, decode=False):
                if cancelled():
                    raise Cancelled(f"{what}: cancelled")
                got += len(chunk)
                if got > want:
                    raise DigestMismatch(
                        f"{what}: more than the {desc.size} bytes its descriptor gives",
                        hint="the image is corrupt or was tampered with; it was not used",
                    )
                digest.update(chunk)
                out.write(chunk)
                out.flush()
                failpoints.hit("fetch.chunk")
        if got != want:
            raise RegistryUnavailable(f"{what}: the connection ended after {offset + got} of {desc.size} bytes")


    @staticmethod
    def _check_descriptor(desc: Descriptor, what: str) -> None:
        if not DIGEST_RE.match(desc.digest):
            raise RegistryError(f"{what}: digest {desc.digest!r} is not sha256:<64 hex>")
        if desc.size < 0:
            raise RegistryError(f"{what}: negative size {desc.size}")

    # --- HTTP: retries, auth, redirects ---

    def _url(self, ref: Reference, path: str) -> str:
        scheme = "http" if ref.registry in self._plain_http else "https"
        return f"{scheme}://{endpoint(ref.registry)}/v2/{ref.repository}/{path}"

    def _retrying(self, what: str, attempt: Callable[[], _T]) -> _T:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self._attempts),
            wait=self._wait_s,
            retry=tenacity.retry_if_exception_type(RegistryUnavailable),
            sleep=self._sleep,
            before_sleep=lambda state: _log_retry(what, state),
        )
        try:
            return retrying(attempt)
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            message = last.message if isinstance(last, AgentError) else str(last)
            raise RegistryUnavailable(
                f"{message} (gave up after {self._attempts} attempts)",
                hint="the registry is down or unreachable; the agent tries again later",
            ) from last

    def _wait_s(self, state: tenacity.RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, _Busy) and exc.retry_after_s is not None:
            return float(min(exc.retry_after_s, self._backoff_max_s))
        backoff = min(self._backoff_max_s, BACKOFF_BASE_S * 2.0 ** (state.attempt_number - 1))
        return float(backoff * random.uniform(0.5, 1.0))  # noqa: S311 - jitter, not a secret

    def _open(self, ref: Reference, url: str, what: str, headers: Mapping[str, str], missing: str) -> requests.Response:
        """One attempt at GET `url` with auth: a 2xx response for the caller to read and close."""
        registry = ref.registry
        scope = f"repository:{ref.repository}:pull"
        authorization = self._authorization(registry, scope)
        resp, final = self._send(url, headers, authorization, what)
        if resp.status_code == 401 and urlsplit(final).netloc == endpoint(registry):
            challenge = resp.headers.get("WWW-Authenticate", "")
            resp.close()
            authorization = self._answer(registry, scope, challenge, authorization, what)
            resp, final = self._send(url, headers, authorization, what)
        try:
            self._raise_for_status(resp, registry, what, missing)
        except BaseException:
            resp.close()
            raise
        return resp

    def _raise_for_status(self, resp: requests.Response, registry: str, what: str, missing: str) -> None:
        status = resp.status_code
        if 200 <= status < 300:
            return
        detail = _error_detail(resp)
        if status in (401, 403):
            self._credentials.forget(registry)  # a helper's short-lived secret is asked for again next time
            raise RegistryError(f"{what}: access denied ({detail})", hint=self._denied_hint(registry))
        if status == 404:
            raise ImageMissing(f"{what}: not found ({detail})", hint=missing)
        if status == 429 or status >= 500:
            retry_after = parse_retry_after(resp.headers.get("Retry-After"), time.time())
            raise _Busy(f"{what}: {registry} answered {detail}", retry_after)
        raise RegistryError(f"{what}: {registry} answered {detail}")

    def _denied_hint(self, registry: str) -> str:
        where = self._credentials.describe(registry)
        helper = self._credentials.helper_for(registry)
        if helper:  # not run again just for a hint: its answer was what was refused, or nothing
            return f"check what docker-credential-{helper} holds for {registry} (docker login {registry}); {where}"
        if self._credentials.lookup(registry) is None:
            return f"no credentials for {registry}: add them to {where}"
        return f"check the user and password for {registry} in {where}"

    def _authorization(self, registry: str, scope: str) -> str | None:
        token = self._tokens.get((registry, scope))
        if token is not None and token.expires_at_s - TOKEN_EXPIRY_MARGIN_S > time.monotonic():
            return f"Bearer {token.value}"
        if registry in self._basic:
            return self._basic_header(registry)
        return None

    def _basic_header(self, registry: str) -> str | None:
        pair = self._credentials.lookup(registry)
        if pair is None or pair[0] == IDENTITY_TOKEN_USER:  # a refresh token is only for the token realm
            return None
        return "Basic " + b64encode(f"{pair[0]}:{pair[1]}".encode()).decode("ascii")

    def _answer(self, registry: str, scope: str, header: str, sent: str | None, what: str) -> str:
        """The Authorization value that answers a 401's challenge (fetching a token if asked)."""
        challenges = {c.scheme: c for c in reversed(parse_www_authenticate(header))}
        bearer, basic = challenges.get("bearer"), challenges.get("basic")
        if bearer is not None and "realm" in bearer.params:
            token = self._fetch_token(registry, bearer, scope, what)
            return f"Bearer {token}"
        if basic is not None:
            self._basic.add(registry)
            value = self._basic_header(registry)
            if value is None or value == sent:
                raise RegistryError(f"{what}: {registry} requires a login", hint=self._denied_hint(registry))
            return value
        raise RegistryError(f"{what}: {registry} asks for authentication this agent does not support: {header!r}")

    def _fetch_token(self, registry: str, challenge: Challenge, scope: str, what: str) -> str:
        realm = challenge.params["realm"]
        parts = urlsplit(realm)
        if parts.scheme not in ("https", "http") or not parts.netloc:
            raise RegistryError(f"{what}: token realm {realm!r} is not an http(s) URL")
        if parts.scheme == "http" and parts.netloc not in self._plain_http:
            raise RegistryError(
                f"{what}: {registry} sends us to the plain-http token realm {realm}; "
                "refusing to send credentials there",
                hint=f"add {parts.netloc!r} to image.plain_http if that is intended",
            )
        query = {"scope": challenge.params.get("scope") or scope}
        if challenge.params.get("service"):
            query["service"] = challenge.params["service"]
        pair = self._credentials.lookup(registry)
        if pair is not None and pair[0] == IDENTITY_TOKEN_USER:  # OAuth2 refresh token, as docker exchanges it
            form = {"grant_type": "refresh_token", "refresh_token": pair[1], "client_id": "nvidia-agent", **query}
            resp, _ = self._send(realm, {}, None, what, form=form)
        else:
            url = realm + ("&" if parts.query else "?") + urlencode(query)
            resp, _ = self._send(url, {}, self._basic_header(registry), what)
        try:
            self._raise_for_status(resp, registry, f"{what}: token from {realm}", "check the token realm")
            body = self._read_capped(resp, TOKEN_MAX_BYTES, what)
        finally:
            resp.close()
        try:
            doc = load_json_object(body, "the token response")
        except ManifestError as exc:
            raise RegistryError(f"{what}: {exc}") from exc
        token = doc.get("token") or doc.get("access_token")
        if not isinstance(token, str) or not token.isascii() or not token.isprintable() or " " in token:
            raise RegistryError(f"{what}: the token realm {realm} returned no usable token")
        ttl = doc.get("expires_in")
        ttl_s = (
            float(ttl)
            if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0
            else TOKEN_DEFAULT_TTL_S
        )
        self._tokens[(registry, scope)] = _Token(token, time.monotonic() + ttl_s)
        return token

    def _send(
        self, url: str, headers: Mapping[str, str], authorization: str | None, what: str,
        form: Mapping[str, str] | None = None,
    ) -> tuple[requests.Response, str]:
        """GET `url` (POST `form` when given, never redirected), following redirects ourselves:
        Authorization goes only to the first host."""
        origin = urlsplit(url).netloc
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if not (parts.scheme == "https" or (parts.scheme == "http" and parts.netloc in self._plain_http)):
                raise RegistryError(
                    f"{what}: refusing {parts.scheme}://{parts.netloc} (not https, not listed as plain http)",
                    hint=f"add {parts.netloc!r} to image.plain_http if it serves plain http",
                )
            sent = {"User-Agent": "nvidia-agent", "Accept-Encoding": "identity", **headers}
            if authorization is not None and parts.netloc == origin:
                sent["Authorization"] = authorization
            resp = self._request(url, sent, what, form)
            if form is None and resp.status_code in _REDIRECTS and resp.headers.get("Location"):
                url = urljoin(url, resp.headers["Location"])
                resp.close()
                continue
            return resp, url
        raise RegistryError(f"{what}: more than {MAX_REDIRECTS} redirects")

    def _request(self, url: str, headers: Mapping[str, str], what: str,
                 form: Mapping[str, str] | None = None) -> requests.Response:
        netloc = urlsplit(url).netloc
        try:
            return self._session.request(
                "GET" if form is None else "POST",
                url,
                data=dict(form) if form is not None else None,
                headers=dict(headers),
                stream=True,
                timeout=self._timeout_s,
                allow_redirects=False,
                auth=_keep_headers,
            )
        except requests.exceptions.SSLError as exc:
            text = str(exc)
            if "CERTIFICATE_VERIFY_FAILED" in text:
                raise RegistryError(
                    f"{what}: {netloc}: TLS certificate not trusted: {_reason(exc)}",
                    hint="install the registry's CA on the host",
                ) from exc
            if "WRONG_VERSION_NUMBER" in text or "record layer failure" in text:
                raise RegistryError(
                    f"{what}: {netloc} does not speak TLS",
                    hint=f"if it serves plain http, add {netloc!r} to image.plain_http",
                ) from exc
            raise RegistryUnavailable(f"{what}: {netloc}: {_reason(exc)}") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RegistryUnavailable(f"{what}: {netloc} unreachable: {_reason(exc)}") from exc
        except requests.RequestException as exc:
            raise RegistryError(f"{what}: request to {netloc} failed: {exc}") from exc

    def _read_capped(self, resp: requests.Response, limit: int, what: str, *, digest_bound: bool = False) -> bytes:
        """The whole body, refusing more than `limit` bytes (DigestMismatch when `limit` is a descriptor's size)."""

        def too_big() -> AgentError:
            if digest_bound:
                return DigestMismatch(f"{what}: more than the {limit} bytes its descriptor gives")
            return RegistryError(f"{what}: response larger than the {limit}-byte limit")

        announced = _content_length(resp)
        if announced is not None and announced > limit:
            raise too_big()
        data = bytearray()
        for chunk in self._chunks(resp, READ_BYTES, what, decode=not digest_bound):
            data += chunk
            if len(data) > limit:
                raise too_big()
        return bytes(data)

    @staticmethod
    def _chunks(resp: requests.Response, size: int, what: str, *, decode: bool) -> Iterator[bytes]:
        """The body in chunks of at most `size`; a broken stream is transient."""
        try:
            yield from resp.raw.stream(size, decode_content=decode)
        except (urllib3.exceptions.HTTPError, requests.RequestException, OSError) as exc:
            raise RegistryUnavailable(f"{what}: download broke off: {_reason(exc)}") from exc


def _content_length(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Length", "")
    return int(value) if value.isascii() and value.isdigit() else None


def _error_detail(resp: requests.Response) -> str:
    """`HTTP 404 MANIFEST_UNKNOWN: manifest unknown` from a distribution error body, if any."""
    text = f"HTTP {resp.status_code}"
    try:
        body = resp.raw.read(ERROR_BODY_MAX_BYTES, decode_content=True)
        errors = json.loads(body).get("errors")
        first = errors[0]
        code, message = first.get("code"), first.get("message")
    except (ValueError, TypeError, AttributeError, IndexError, KeyError, RecursionError, urllib3.exceptions.HTTPError,
            OSError):
        return text
    if isinstance(code, str) and isinstance(message, str):
        return f"{text} {code[:64]}: {message[:200]}"
    return text


def _reason(exc: BaseException) -> str:
    """The innermost useful message of a requests/urllib3 exception, without object reprs."""
    inner: BaseException = exc
    for _ in range(8):
        nxt = getattr(inner, "reason", None)
        if not isinstance(nxt, BaseException) and inner.args and isinstance(inner.args[0], BaseException):
            nxt = inner.args[0]
        if not isinstance(nxt, BaseException) or nxt is inner:
            break
        inner = nxt
    first = inner.args[0] if inner.args else None
    text = first if isinstance(first, str) and len(inner.args) > 1 else str(inner)
    text = re.sub(r"^(?:<[^>]*>|\w+\([^)]*\)):\s*", "", text)  # "HTTPConnection(host=..): ", "<obj at 0x..>: "
    return (text or type(inner).__name__)[:300]


def _log_retry(what: str, state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome is not None else None
    wait_s = state.next_action.sleep if state.next_action is not None else None
    log.warning("registry_retry", what=what, attempt=state.attempt_number, wait_s=wait_s, error=str(exc))
