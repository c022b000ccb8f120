"""The registry client against a real registry (Debian docker-registry) on 127.0.0.1, with auth and faults."""

from __future__ import annotations

import base64
import json
import os
import re
import resource
import shutil
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from agent import subp
from agent.credentials import Credentials
from agent.errors import Cancelled, DigestMismatch, HostError, RegistryError, RegistryUnavailable
from agent.fetch.manifest import Descriptor, Platform, ResolvedImage
from agent.fetch.registry import RegistryClient
from agent.reference import Reference
from support.flaky_proxy import BlobStore, Fault, FlakyProxy, blobs, manifests
from support.registry import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    PushedImage,
    RegistryServer,
    TokenServer,
    free_port,
    push_image,
    push_index,
    sha256_digest,
    tar_layer,
)

pytestmark = pytest.mark.integration

AMD64 = Platform("linux", "amd64")
ARM64 = Platform("linux", "arm64", "v8")
USER, PASSWORD = "alice", "s3cret-pw"
LARGE_BLOB_BYTES = 200 * 1024 * 1024
FLAT_MEMORY_BYTES = 8 * 1024 * 1024


class Sleeps(list[float]):
    """An injected sleep that records what it was asked to wait instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def client_for(*hosts: str, credentials: Credentials | None = None, **kwargs: Any) -> tuple[RegistryClient, Sleeps]:
    sleeps = Sleeps()
    client = RegistryClient(plain_http=hosts, credentials=credentials, sleep=sleeps, timeout_s=10.0, **kwargs)
    return client, sleeps


def creds_file(tmp_path: Path, registry: str, user: str, password: str) -> Credentials:
    path = tmp_path / "auth.json"
    path.write_text(
        json.dumps({"auths": {registry: {"auth": base64.b64encode(f"{user}:{password}".encode()).decode()}}})
    )
    return Credentials.load(path)


def ref(host: str, repo: str, tag: str) -> Reference:
    return Reference(host, repo, tag)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture
def registry(registry_server: RegistryServer) -> RegistryServer:
    return registry_server


@pytest.fixture(scope="module")
def basic_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RegistryServer]:
    """A registry with htpasswd (bcrypt) basic auth over plain http."""
    with RegistryServer(tmp_path_factory.mktemp("basic"), htpasswd={USER: PASSWORD}) as server:
        yield server


@pytest.fixture(scope="module")
def token_server() -> Iterator[TokenServer]:
    server = TokenServer({USER: PASSWORD}).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def token_registry(tmp_path_factory: pytest.TempPathFactory, token_server: TokenServer) -> Iterator[RegistryServer]:
    """A registry with distribution's bearer token auth, trusting `token_server`'s x5c signing cert."""
    with RegistryServer(tmp_path_factory.mktemp("token"), token=token_server) as server:
        yield server


def simple_image(server: RegistryServer, repo: str, tag: str, **kwargs: Any) -> PushedImage:
    layer = tar_layer({"nvidia-driver/manifest.json": f'{{"tag": "{tag}"}}'.encode()})
    return push_image(server.pusher, repo, tag, [layer], **kwargs)


# --- resolving ----------------------------------------------------------------------------------


def test_resolve_oci_manifest(registry: RegistryServer) -> None:
    """A tag pointing at an OCI manifest resolves to that manifest's digest, config and layers."""
    image = simple_image(registry, "t/oci", "v1")
    client, _ = client_for(registry.host)
    resolved = client.resolve(ref(registry.host, "t/oci", "v1"), AMD64)
    assert resolved.reference == Reference(registry.host, "t/oci", "v1", image.digest)
    assert resolved.index_digest is None
    assert resolved.media_type == OCI_MANIFEST
    assert resolved.layers == tuple(Descriptor(d["mediaType"], d["digest"], d["size"]) for d in image.layers)
    assert client.fetch_config(resolved.reference, resolved.config)["architecture"] == "amd64"


def test_resolve_pinned_digest(registry: RegistryServer) -> None:
    """A reference pinned by digest resolves to exactly that manifest."""
    image = simple_image(registry, "t/pinned", "v1")
    client, _ = client_for(registry.host)
    pinned = Reference(registry.host, "t/pinned", "v1", image.digest)
    assert client.resolve(pinned, AMD64).reference == pinned


def test_oci_index_picks_the_platform(registry: RegistryServer) -> None:
    """An OCI index yields the amd64 entry for amd64 and the arm64 entry for arm64; attestations are skipped."""
    amd = simple_image(registry, "t/index", "amd")
    arm = simple_image(registry, "t/index", "arm", arch="arm64", variant="v8")
    attestation = dict(amd.descriptor(("unknown", "unknown", None)))
    index = push_index(
        registry.pusher,
        "t/index",
        "multi",
        [attestation, amd.descriptor(("linux", "amd64", None)), arm.descriptor(("linux", "arm64", "v8"))],
    )
    client, _ = client_for(registry.host)
    for platform, image in ((AMD64, amd), (ARM64, arm), (Platform.host("aarch64"), arm)):
        resolved = client.resolve(ref(registry.host, "t/index", "multi"), platform)
        assert resolved.reference.digest == image.digest
        assert resolved.index_digest == index.digest
        assert resolved.media_type == OCI_MANIFEST
    assert index.media_type == OCI_INDEX


def test_docker_manifest_list(registry: RegistryServer) -> None:
    """Docker v2 schema 2 manifests behind a Docker manifest list resolve like OCI ones."""
    amd = simple_image(registry, "t/docker", "amd", fmt="docker")
    arm = simple_image(registry, "t/docker", "arm", fmt="docker", arch="arm64")
    listing = push_index(
        registry.pusher,
        "t/docker",
        "multi",
        [arm.descriptor(("linux", "arm64", None)), amd.descriptor(("linux", "amd64", None))],
        fmt="docker",
    )
    assert listing.media_type == DOCKER_LIST
    client, _ = client_for(registry.host)
    resolved = client.resolve(ref(registry.host, "t/docker", "multi"), AMD64)
    assert (resolved.reference.digest, resolved.index_digest) == (amd.digest, listing.digest)
    assert resolved.media_type == DOCKER_MANIFEST
    assert resolved.layers[0].media_type == "application/vnd.docker.image.rootfs.diff.tar.gzip"
    assert client.resolve(ref(registry.host, "t/docker", "arm"), ARM64).reference.digest == arm.digest


def test_platform_mismatch_lists_available_platforms(registry: RegistryServer) -> None:
    """No entry for the host: RegistryError naming the platforms the index has; a lone arm64 image is refused too."""
    arm = simple_image(registry, "t/foreign", "arm", arch="arm64")
    ppc = simple_image(registry, "t/foreign", "ppc", arch="ppc64le")
    push_index(
        registry.pusher,
        "t/foreign",
        "multi",
        [arm.descriptor(("linux", "arm64", None)), ppc.descriptor(("linux", "ppc64le", None))],
    )
    client, _ = client_for(registry.host)
    with pytest.raises(RegistryError, match=r"no linux/amd64 image in the index; it has linux/arm64, linux/ppc64le"):
        client.resolve(ref(registry.host, "t/foreign", "multi"), AMD64)
    with pytest.raises(RegistryError, match="built for linux/arm64, not linux/amd64"):
        client.resolve(ref(registry.host, "t/foreign", "arm"), AMD64)


def test_zstd_layer_is_refused(registry: RegistryServer) -> None:
    """A manifest with a zstd layer is refused at resolve, naming the media type."""
    zstd = "application/vnd.oci.image.layer.v1.tar+zstd"
    simple_image(registry, "t/zstd", "v1", layer_media_type=zstd)
    client, _ = client_for(registry.host)
    with pytest.raises(
        RegistryError,
        match=rf"resolve .*t/zstd:v1: manifest sha256:\w+: layer 0 has media type {re.escape(zstd)}: zstd",
    ):
        client.resolve(ref(registry.host, "t/zstd", "v1"), AMD64)


def test_missing_tag_is_not_retried(registry: RegistryServer) -> None:
    """A 404 is a RegistryError with the push-one hint, asked once, never retried."""
    with FlakyProxy(registry.host) as proxy:
        client, sleeps = client_for(proxy.host)
        missing = ref(proxy.host, "t/none", "535-x")
        with pytest.raises(RegistryError) as info:
            client.resolve(missing, AMD64)
    assert not isinstance(info.value, RegistryUnavailable)
    assert info.value.message.startswith(f"resolve {missing}: not found (HTTP 404")
    assert info.value.hint == (
        f"no image tagged 535-x in {proxy.host}/t/none; push one built for this host "
        "or check image.repository / image.tag_template"
    )
    assert proxy.count() == 1
    assert sleeps == []


def test_plain_http_needs_listing(registry: RegistryServer) -> None:
    """A registry not listed as plain http is spoken to over TLS, and the refusal says what to list."""
    client, sleeps = client_for()
    with pytest.raises(RegistryError, match="does not speak TLS") as info:
        client.resolve(ref(registry.host, "t/oci", "v1"), AMD64)
    assert info.value.hint is not None
    assert "image.plain_http" in info.value.hint
    assert sleeps == []


# --- transient failures -------------------------------------------------------------------------


def test_two_500s_then_recovery(registry: RegistryServer) -> None:
    """Two 500s are retried with backoff and the third attempt succeeds."""
    image = simple_image(registry, "t/flaky", "v1")
    with FlakyProxy(registry.host, fail_first=2, fail_when=manifests) as proxy, capture_logs() as logs:
        client, sleeps = client_for(proxy.host, backoff_max_s=4.0)
        resolved = client.resolve(ref(proxy.host, "t/flaky", "v1"), AMD64)
    retries = [e for e in logs if e["event"] == "registry_retry"]
    assert [(e["log_level"], e["attempt"]) for e in retries] == [("warning", 1), ("warning", 2)]
    assert retries[0]["what"] == f"resolve {proxy.host}/t/flaky:v1"
    assert resolved.reference.digest == image.digest
    assert [s.status for s in proxy.seen if "/manifests/" in s.path] == [500, 500, 200]
    assert len(sleeps) == 2
    assert 0.5 <= sleeps[0] <= 1.0
    assert 1.0 <= sleeps[1] <= 2.0


def test_500_forever_gives_up_after_attempts(registry: RegistryServer) -> None:
    """A registry that keeps failing raises RegistryUnavailable after exactly `attempts` tries, waits capped."""
    simple_image(registry, "t/down", "v1")
    with FlakyProxy(registry.host, fail_first=1000, fail_status=503) as proxy:
        client, sleeps = client_for(proxy.host, attempts=4, backoff_max_s=1.5)
        with pytest.raises(RegistryUnavailable, match="gave up after 4 attempts") as info:
            client.resolve(ref(proxy.host, "t/down", "v1"), AMD64)
    assert "HTTP 503 UNAVAILABLE: injected failure" in info.value.message
    assert proxy.count() == 4
    assert len(sleeps) == 3
    assert all(s <= 1.5 for s in sleeps)


def test_429_retry_after_is_honoured(registry: RegistryServer) -> None:
    """A 429 with a small Retry-After waits exactly that long before the next try."""
    simple_image(registry, "t/busy", "v1")
    with FlakyProxy(registry.host, fail_first=1, fail_status=429, fail_headers={"Retry-After": "3"}) as proxy:
        client, sleeps = client_for(proxy.host)
        client.resolve(ref(proxy.host, "t/busy", "v1"), AMD64)
    assert sleeps == [3.0]


def test_unreachable_registry_is_transient(tmp_path: Path) -> None:
    """Connection refused is RegistryUnavailable after the retries, with the address in the message."""
    host = f"127.0.0.1:{free_port()}"
    client, sleeps = client_for(host, attempts=2)
    with pytest.raises(RegistryUnavailable, match=f"resolve {host}/t/x:1: {host} unreachable: .*refused"):
        client.resolve(ref(host, "t/x", "1"), AMD64)
    assert len(sleeps) == 1


# --- blobs --------------------------------------------------------------------------------------


def test_fetch_blob_writes_verified_file(registry: RegistryServer, tmp_path: Path) -> None:
    """A layer downloads to dest with the exact bytes; no .partial remains."""
    layer = tar_layer({"a": os.urandom(3 * 1024 * 1024)})  # several chunks
    image = push_image(registry.pusher, "t/blob", "v1", [layer])
    client, _ = client_for(registry.host)
    resolved = client.resolve(ref(registry.host, "t/blob", "v1"), AMD64)
    client.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == layer
    assert sha256_digest(layer) == image.layers[0]["digest"]
    assert leftovers(tmp_path) == ["layer"]


def test_wrong_size_is_a_digest_mismatch(registry: RegistryServer, tmp_path: Path) -> None:
    """A descriptor whose size disagrees with the blob raises DigestMismatch and leaves no file."""
    data = b"driver bits" * 1000
    digest = registry.pusher.push_blob("t/size", data)
    client, sleeps = client_for(registry.host)
    for size in (len(data) - 1, len(data) + 1):
        with pytest.raises(DigestMismatch, match=f"pull .*: blob {digest}: the registry sends {len(data)} bytes"):
            client.fetch_blob(ref(registry.host, "t/size", "v1"), Descriptor("x", digest, size), tmp_path / "blob")
    assert leftovers(tmp_path) == []
    assert sleeps == []


def test_corrupted_body_is_a_digest_mismatch(registry: RegistryServer, tmp_path: Path) -> None:
    """A blob corrupted on every download is fetched once more, then refused; nothing is left behind.
    A config is small and verified in memory: refused at once."""
    image = simple_image(registry, "t/corrupt", "v1")
    with FlakyProxy(registry.host, corrupt_when=blobs) as proxy:
        client, sleeps = client_for(proxy.host)
        target = Reference(proxy.host, "t/corrupt", "v1", image.digest)
        layer = image.layers[0]
        with pytest.raises(DigestMismatch, match="the content has digest sha256:"):
            client.fetch_blob(target, Descriptor(layer["mediaType"], layer["digest"], layer["size"]), tmp_path / "l")
        with pytest.raises(DigestMismatch):
            client.fetch_config(target, Descriptor("application/vnd.oci.image.config.v1+json", *_config_of(image)))
    assert leftovers(tmp_path) == []
    assert proxy.count(blobs) == 3  # the layer twice, the config once
    assert sleeps == []


def test_one_corrupted_download_is_fetched_again(registry: RegistryServer, tmp_path: Path) -> None:
    """A byte flipped in transit costs one more download of that blob, not the whole reconcile."""
    layer = tar_layer({"a": os.urandom(512 * 1024)})
    image = push_image(registry.pusher, "t/flip", "v1", [layer])
    with FlakyProxy(registry.host, faults=(Fault.corrupt(offset=1000, when=blobs, times=1),)) as proxy:
        client, sleeps = client_for(proxy.host)
        desc = Descriptor(image.layers[0]["mediaType"], image.layers[0]["digest"], len(layer))
        client.fetch_blob(Reference(proxy.host, "t/flip", "v1"), desc, tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == layer
    assert [s.fault for s in proxy.seen if blobs(s.method, s.path)] == ["corrupt", None]
    assert leftovers(tmp_path) == ["layer"]
    assert sleeps == []


def _config_of(image: PushedImage) -> tuple[str, int]:
    manifest = json.loads(image.body)
    return manifest["config"]["digest"], manifest["config"]["size"]


def test_corrupted_manifest_by_digest_is_a_digest_mismatch(registry: RegistryServer) -> None:
    """A manifest fetched by digest whose bytes hash to something else raises DigestMismatch."""
    image = simple_image(registry, "t/mcorrupt", "v1")
    with FlakyProxy(registry.host, corrupt_when=manifests) as proxy:
        client, _ = client_for(proxy.host)
        with pytest.raises(DigestMismatch, match=f"manifest {image.digest} came back with digest"):
            client.resolve(Reference(proxy.host, "t/mcorrupt", "v1", image.digest), AMD64)


@pytest.mark.parametrize("fault", ["reset", "truncate"])
def test_broken_download_resumes_where_it_stopped(registry: RegistryServer, tmp_path: Path, fault: str) -> None:
    """A connection reset or cut mid-blob is transient: the next attempt asks for the rest with a Range
    request (bytes=<what it has>-), and the file is complete and verified."""
    layer = tar_layer({"a": os.urandom(2 * 1024 * 1024)})
    image = push_image(registry.pusher, "t/cut", "v1", [layer])
    cut = {"reset": Fault.reset, "truncate": Fault.truncate}[fault](after_bytes=700_000, when=blobs, times=1)
    with FlakyProxy(registry.host, faults=(cut,)) as proxy:
        client, sleeps = client_for(proxy.host)
        desc = Descriptor(image.layers[0]["mediaType"], image.layers[0]["digest"], len(layer))
        client.fetch_blob(Reference(proxy.host, "t/cut", "v1"), desc, tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == layer
    first, second = (s for s in proxy.seen if blobs(s.method, s.path))
    assert (first.range, first.status, first.sent_bytes) == (None, 200, 700_000)
    # What reached the disk before the break (a read in progress when the connection dies is lost).
    resumed_at = int((second.range or "").removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= 700_000
    assert (second.status, second.sent_bytes) == (206, len(layer) - resumed_at)
    assert len(sleeps) == 1
    assert leftovers(tmp_path) == ["layer"]


def test_a_registry_that_ignores_range_gets_a_fresh_download(registry: RegistryServer, tmp_path: Path) -> None:
    """A partial file from an earlier attempt is resumed only if the server answers 206; a 200 means the
    whole blob again, written from the start (not appended)."""
    layer = tar_layer({"a": os.urandom(600 * 1024)})
    image = push_image(registry.pusher, "t/norange", "v1", [layer])
    desc = Descriptor(image.layers[0]["mediaType"], image.layers[0]["digest"], len(layer))
    (tmp_path / "layer.partial").write_bytes(layer[:1000])
    with BlobStore({f"/v2/t/norange/blobs/{desc.digest}": layer}) as plain:  # serves 200, ignores Range
        client, _ = client_for(plain.host)
        client.fetch_blob(Reference(plain.host, "t/norange", "v1"), desc, tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == layer
    assert leftovers(tmp_path) == ["layer"]


def test_cancel_keeps_the_partial_download_for_the_next_attempt(registry: RegistryServer, tmp_path: Path) -> None:
    """cancelled() turning true between chunks raises Cancelled; the partial file stays, and the next
    fetch resumes from it with a Range request instead of starting over."""
    layer = tar_layer({"a": os.urandom(3 * 1024 * 1024)})
    image = push_image(registry.pusher, "t/cancel", "v1", [layer])
    calls = iter(range(100))
    desc = Descriptor(image.layers[0]["mediaType"], image.layers[0]["digest"], len(layer))
    with FlakyProxy(registry.host) as proxy:
        client, _ = client_for(proxy.host)
        target = Reference(proxy.host, "t/cancel", "v1")
        with pytest.raises(Cancelled, match="cancelled"):
            client.fetch_blob(target, desc, tmp_path / "layer", cancelled=lambda: next(calls) >= 2)
        assert leftovers(tmp_path) == ["layer.partial"]
        have = (tmp_path / "layer.partial").stat().st_size
        assert 0 < have < len(layer)
        client.fetch_blob(target, desc, tmp_path / "layer")
    assert (tmp_path / "layer").read_bytes() == layer
    assert proxy.seen[-1].range == f"bytes={have}-"
    assert leftovers(tmp_path) == ["layer"]


def test_unwritable_destination_is_a_host_error(registry: RegistryServer, tmp_path: Path) -> None:
    """A destination directory that does not exist is a HostError naming the path, not retried."""
    data = b"abc"
    digest = registry.pusher.push_blob("t/nodir", data)
    client, sleeps = client_for(registry.host)
    dest = tmp_path / "missing" / "blob"
    with pytest.raises(HostError, match=f"cannot write {dest}.partial: No such file or directory"):
        client.fetch_blob(ref(registry.host, "t/nodir", "v1"), Descriptor("x", digest, 3), dest)
    assert sleeps == []


def test_missing_blob_is_not_retried(registry: RegistryServer, tmp_path: Path) -> None:
    """A blob the registry lacks is a RegistryError (push again), asked once."""
    with FlakyProxy(registry.host) as proxy:
        client, _ = client_for(proxy.host)
        absent = Descriptor("x", "sha256:" + "0" * 64, 10)
        with pytest.raises(RegistryError, match="not found") as info:
            client.fetch_blob(Reference(proxy.host, "t/none", "v1"), absent, tmp_path / "b")
    assert info.value.hint == f"{proxy.host}/t/none lacks blob {absent.digest}; push the image again"
    assert proxy.count() == 1
    assert leftovers(tmp_path) == []


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0); False where the kernel or sandbox does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _vm_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_large_blob_streams_with_flat_memory(registry: RegistryServer, tmp_path: Path) -> None:
    """A 200 MiB blob downloads and verifies while Python allocations and RSS grow by only a few MiB."""
    block = os.urandom(1024 * 1024)

    def chunks() -> Iterator[bytes]:
        for i in range(LARGE_BLOB_BYTES // len(block)):
            yield i.to_bytes(8, "big") + block[8:]

    digest, size = registry.pusher.push_blob_stream("t/large", chunks)
    client, _ = client_for(registry.host)
    desc = Descriptor("application/vnd.oci.image.layer.v1.tar", digest, size)
    reset = _reset_peak_rss()
    rss_before, peak_before = _vm_rss_bytes(), _peak_rss_bytes()
    tracemalloc.start()
    try:
        client.fetch_blob(ref(registry.host, "t/large", "v1"), desc, tmp_path / "large")
        _, traced_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (tmp_path / "large").stat().st_size == LARGE_BLOB_BYTES
    assert traced_peak < FLAT_MEMORY_BYTES, f"python allocations peaked at {traced_peak} bytes"
    if reset:
        assert _vm_hwm_bytes() - rss_before < 2 * FLAT_MEMORY_BYTES
    else:
        assert _peak_rss_bytes() - peak_before < 2 * FLAT_MEMORY_BYTES
    (tmp_path / "large").unlink()


# --- auth ---------------------------------------------------------------------------------------


def test_basic_auth(basic_registry: RegistryServer, tmp_path: Path) -> None:
    """With credentials for the registry, a basic-auth registry resolves and serves blobs."""
    image = simple_image(basic_registry, "t/basic", "v1")
    creds = creds_file(tmp_path, basic_registry.host, USER, PASSWORD)
    client, _ = client_for(basic_registry.host, credentials=creds)
    resolved = client.resolve(ref(basic_registry.host, "t/basic", "v1"), AMD64)
    assert resolved.reference.digest == image.digest
    client.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "layer")
    assert sha256_digest((tmp_path / "layer").read_bytes()) == resolved.layers[0].digest


def test_basic_auth_wrong_password_names_the_credentials(basic_registry: RegistryServer, tmp_path: Path) -> None:
    """A wrong password is a RegistryError (not retried) whose hint names the auth file and its key."""
    simple_image(basic_registry, "t/basic", "v1")
    creds = creds_file(tmp_path, basic_registry.host, USER, "wrong")
    client, sleeps = client_for(basic_registry.host, credentials=creds)
    with pytest.raises(RegistryError, match=r"access denied \(HTTP 401 UNAUTHORIZED") as info:
        client.resolve(ref(basic_registry.host, "t/basic", "v1"), AMD64)
    assert info.value.hint == (
        f'check the user and password for {basic_registry.host} in "auths" -> "{basic_registry.host}" '
        f"in {tmp_path / 'auth.json'} (image.auth_file)"
    )
    assert sleeps == []
    anonymous, _ = client_for(basic_registry.host)
    with pytest.raises(RegistryError, match="requires a login") as info:
        anonymous.resolve(ref(basic_registry.host, "t/basic", "v1"), AMD64)
    assert info.value.hint is not None
    assert info.value.hint.startswith(f"no credentials for {basic_registry.host}: add them to")


def test_token_auth(token_registry: RegistryServer, token_server: TokenServer, tmp_path: Path) -> None:
    """The bearer flow: 401 challenge, token from the realm with basic creds, retry; the token is cached."""
    image = simple_image(token_registry, "t/token", "v1")
    creds = creds_file(tmp_path, token_registry.host, USER, PASSWORD)
    client, _ = client_for(token_registry.host, token_server.host, credentials=creds)
    before = len(token_server.requests)
    resolved = client.resolve(ref(token_registry.host, "t/token", "v1"), AMD64)
    assert resolved.reference.digest == image.digest
    client.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "layer")
    assert token_server.requests[before:] == [(USER, "repository:t/token:pull")]


def test_token_auth_wrong_password(token_registry: RegistryServer, token_server: TokenServer, tmp_path: Path) -> None:
    """The token realm refusing the login is a RegistryError naming the credentials to fix."""
    simple_image(token_registry, "t/token", "v1")
    creds = creds_file(tmp_path, token_registry.host, USER, "nope")
    client, sleeps = client_for(token_registry.host, token_server.host, credentials=creds)
    with pytest.raises(RegistryError, match=r"token from .*access denied") as info:
        client.resolve(ref(token_registry.host, "t/token", "v1"), AMD64)
    assert info.value.hint is not None
    assert str(tmp_path / "auth.json") in info.value.hint
    assert sleeps == []


def test_token_realm_over_plain_http_needs_listing(
    token_registry: RegistryServer, token_server: TokenServer, tmp_path: Path
) -> None:
    """Credentials are never sent to a plain-http token realm that is not listed in plain_http."""
    creds = creds_file(tmp_path, token_registry.host, USER, PASSWORD)
    client, _ = client_for(token_registry.host, credentials=creds)
    before = len(token_server.requests)
    with pytest.raises(RegistryError, match="plain-http token realm") as info:
        client.resolve(ref(token_registry.host, "t/token", "v1"), AMD64)
    assert info.value.hint == f"add {token_server.host!r} to image.plain_http if that is intended"
    assert len(token_server.requests) == before


def test_redirect_to_storage_drops_authorization(basic_registry: RegistryServer, tmp_path: Path) -> None:
    """A blob redirected to another host:port is fetched there without the registry's Authorization header."""
    image = simple_image(basic_registry, "t/redirect", "v1")
    layer = image.layers[0]
    data = tar_layer({"nvidia-driver/manifest.json": b'{"tag": "v1"}'})
    assert sha256_digest(data) == layer["digest"]
    with BlobStore({f"/store/{layer['digest']}": data}) as store:

        def to_store(path: str) -> str | None:
            return f"{store.url}/store/{layer['digest']}" if path.endswith(f"/blobs/{layer['digest']}") else None

        with FlakyProxy(basic_registry.host, redirect=to_store) as proxy:
            creds = creds_file(tmp_path, proxy.host, USER, PASSWORD)
            client, _ = client_for(proxy.host, store.host, credentials=creds)
            resolved = client.resolve(Reference(proxy.host, "t/redirect", "v1"), AMD64)
            client.fetch_blob(resolved.reference, resolved.layers[0], tmp_path / "blob")
            blob_requests = [s for s in proxy.seen if s.path.endswith(layer["digest"])]
    assert (tmp_path / "blob").read_bytes() == data
    assert store.authorization == [None]
    assert [s.status for s in blob_requests] == [307]
    assert (blob_requests[0].authorization or "").startswith("Basic ")


def test_redirect_to_unlisted_plain_http_is_refused(registry: RegistryServer, tmp_path: Path) -> None:
    """A redirect to a plain-http host that is not listed is refused rather than followed."""
    data = b"x" * 10
    digest = registry.pusher.push_blob("t/redirect2", data)
    with (
        BlobStore({f"/s/{digest}": data}) as store,
        FlakyProxy(registry.host, redirect=lambda _: f"{store.url}/s/{digest}") as proxy,
    ):
        client, _ = client_for(proxy.host)
        with pytest.raises(RegistryError, match=f"refusing http://{store.host}"):
            client.fetch_blob(Reference(proxy.host, "t/redirect2", "v1"), Descriptor("x", digest, 10), tmp_path / "b")
    assert store.authorization == []


# --- images made by other tools -----------------------------------------------------------------


@pytest.mark.skipif(shutil.which("umoci") is None or shutil.which("skopeo") is None, reason="needs umoci and skopeo")
def test_image_built_by_umoci_and_pushed_by_skopeo(registry: RegistryServer, tmp_path: Path) -> None:
    """An image the agent did not make (umoci layout, skopeo copy) resolves and its blobs verify."""
    layout = tmp_path / "layout"
    subp.run(["umoci", "init", "--layout", str(layout)])
    subp.run(["umoci", "new", "--image", f"{layout}:t"])
    bundle = tmp_path / "bundle"
    subp.run(["umoci", "unpack", "--rootless", "--image", f"{layout}:t", str(bundle)])
    (bundle / "rootfs" / "nvidia-driver").mkdir()
    (bundle / "rootfs" / "nvidia-driver" / "manifest.json").write_text("{}")
    subp.run(["umoci", "repack", "--image", f"{layout}:t", str(bundle)])
    subp.run(["umoci", "config", "--image", f"{layout}:t", "--architecture", "amd64", "--os", "linux"])
    subp.run(
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:t", f"docker://{registry.host}/t/umoci:v1"],
        timeout_s=60,
    )
    client, _ = client_for(registry.host)
    resolved: ResolvedImage = client.resolve(ref(registry.host, "t/umoci", "v1"), AMD64)
    assert resolved.layers
    for i, layer in enumerate(resolved.layers):
        client.fetch_blob(resolved.reference, layer, tmp_path / f"layer{i}")
    assert client.fetch_config(resolved.reference, resolved.config)["os"] == "linux"


# --- credential helpers and identity tokens (as docker uses them) ------------------------------------


def helper_program(directory: Path, name: str, answer: Path) -> None:
    """docker-credential-<name>: a program speaking the helper protocol (`get`, the server on stdin, JSON out),
    answering what `answer` holds at the time it runs, logging each server it was asked for."""
    script = directory / f"docker-credential-{name}"
    script.write_text(f'#!/bin/sh\n[ "$1" = get ] || exit 2\nread -r server\necho "$server" >> {directory}/asked\n'
                      f'if [ -s {answer} ]; then cat {answer}; else echo "credentials not found in native keychain";'
                      " exit 1; fi\n")
    script.chmod(0o755)


def test_a_credential_helper_is_run_as_docker_runs_it_and_read_again_when_refused(
        basic_registry: RegistryServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """credHelpers names the helper for this registry; its answer is kept, and asked for again once the registry
    refuses it (a rotated short-lived password)."""
    image = simple_image(basic_registry, "t/helper", "v1")
    answer = tmp_path / "answer.json"
    helper_program(tmp_path, "nvtest", answer)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "auth.json").write_text(json.dumps({"credHelpers": {basic_registry.host: "nvtest"},
                                                    "auths": {basic_registry.host: {}}}))
    creds = Credentials.load(tmp_path / "auth.json")
    client, _ = client_for(basic_registry.host, credentials=creds)
    target = ref(basic_registry.host, "t/helper", "v1")

    answer.write_text(json.dumps({"ServerURL": basic_registry.host, "Username": USER, "Secret": "expired"}))
    with pytest.raises(RegistryError, match=r"requires a login|access denied") as info:
        client.resolve(target, AMD64)
    assert info.value.hint is not None and "docker-credential-nvtest" in info.value.hint
    answer.write_text(json.dumps({"ServerURL": basic_registry.host, "Username": USER, "Secret": PASSWORD}))
    assert client.resolve(target, AMD64).reference.digest == image.digest
    assert client.resolve(target, AMD64).reference.digest == image.digest
    asked = (tmp_path / "asked").read_text().splitlines()
    assert asked == [basic_registry.host, basic_registry.host], "asked once per refusal, then kept"

    answer.write_text("")  # the helper has nothing for it: anonymous, refused by this registry
    (tmp_path / "auth.json").write_text(json.dumps({"credsStore": "nvtest"}))
    client, _ = client_for(basic_registry.host, credentials=Credentials.load(tmp_path / "auth.json"))
    with pytest.raises(RegistryError, match="requires a login") as info:
        client.resolve(target, AMD64)
    assert info.value.hint is not None and "docker-credential-nvtest" in info.value.hint


def test_an_identity_token_is_exchanged_at_the_token_realm(token_registry: RegistryServer, token_server: TokenServer,
                                                          tmp_path: Path) -> None:
    """`docker login` to an OAuth registry leaves an identity token: it is a refresh token, POSTed to the realm."""
    image = simple_image(token_registry, "t/identity", "v1")
    token_server.refresh_tokens["refresh-abc"] = USER
    (tmp_path / "auth.json").write_text(json.dumps({"auths": {token_registry.host: {"identitytoken": "refresh-abc"}}}))
    client, _ = client_for(token_registry.host, token_server.host, credentials=Credentials.load(tmp_path / "auth.json"))
    assert client.resolve(ref(token_registry.host, "t/identity", "v1"), AMD64).reference.digest == image.digest
    form = token_server.posts[-1]
    assert (form["grant_type"], form["refresh_token"], form["scope"]) == (
        ["refresh_token"], ["refresh-abc"], ["repository:t/identity:pull"])

    (tmp_path / "auth.json").write_text(json.dumps({"auths": {token_registry.host: {"identitytoken": "revoked"}}}))
    client, _ = client_for(token_registry.host, token_server.host, credentials=Credentials.load(tmp_path / "auth.json"))
    with pytest.raises(RegistryError, match="token from"):
        client.resolve(ref(token_registry.host, "t/identity", "v1"), AMD64)
