"""Images from anywhere (issue 10): archives imported offline, mirrors, pinned digests.

Archives are made by third-party tools (skopeo's oci-archive, docker-archive and OCI layout
directory), from an image pushed to the real registry; the agent then installs from what was
imported with that registry stopped. Mirrors are proxies in front of the real registry that
fail or lie.
"""

from __future__ import annotations

import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from support.flaky_proxy import Fault, FlakyProxy, manifests
from support.registry import RegistryServer, free_port
from support.sandbox import DRIVER, K1, REPO, Host, push_driver, tag, tree_path

pytestmark = [pytest.mark.integration, pytest.mark.subprocess]

IMAGES = "var/lib/nvidia-agent/images"


def skopeo_copy(src: str, dest: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", src, dest], check=True, timeout=120,
                   capture_output=True)


def imported_names(host: Host) -> list[str]:
    index = host.root / IMAGES / "index.json"
    if not index.exists():
        return []
    return sorted(m["annotations"]["io.containerd.image.name"] for m in json.loads(index.read_text())["manifests"])


def stored_blobs(host: Host) -> list[str]:
    blobs = host.root / IMAGES / "blobs/sha256"
    return sorted(p.name for p in blobs.iterdir()) if blobs.exists() else []


@pytest.mark.parametrize("kind", ["oci-archive", "docker-archive", "oci-dir"])
def test_an_imported_archive_installs_with_no_registry(kind: str, tmp_path: Path, registry: RegistryServer,
                                                       host: Host) -> None:
    """skopeo writes the archive; `import` takes it; the registry stops; the daemon installs from it."""
    push_driver(tmp_path, registry.host, K1)
    name = f"{registry.host}/{REPO}:{tag(K1)}"
    path = tmp_path / ("layout" if kind == "oci-dir" else f"image.{kind}.tar")
    transport = {"oci-archive": "oci-archive", "docker-archive": "docker-archive", "oci-dir": "oci"}[kind]
    # oci-archive and oci: a bare tag (the configured repository's); docker-archive: the whole name
    skopeo_copy(f"docker://{name}", f"{transport}:{path}:{name if kind == 'docker-archive' else tag(K1)}")
    registry.stop()

    out = host.agent("import", str(path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"imported {name} (sha256:" in out.stdout, out.stdout
    assert imported_names(host) == [name]
    listed = host.agent("import", "--list")
    assert listed.stdout.startswith(f"{name}  sha256:"), listed.stdout

    run = host.once()
    assert run.returncode == 0, run.stdout + run.stderr
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"
    assert '"source": "imported"' in run.stdout or "source=imported" in run.stdout, run.stdout
    assert (host.root / tree_path(K1).lstrip("/") / "lib64").is_dir()
    assert imported_names(host) == [name], "an installed import stays: the host's offline copy"


def _flip_in_largest(archive: Path) -> str:
    """Flip one byte in the middle of the archive's largest member (its layer); that member's name."""
    with tarfile.open(archive) as tar:
        largest = max(tar.getmembers(), key=lambda m: m.size)
    data = bytearray(archive.read_bytes())
    data[largest.offset_data + largest.size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    return largest.name


@pytest.mark.parametrize(("kind", "says"), [("oci-archive", "the content has digest"),
                                           ("docker-archive", "rootfs.diff_ids")])
def test_a_tampered_archive_is_refused_and_nothing_is_kept(kind: str, says: str, tmp_path: Path,
                                                           registry: RegistryServer, host: Host) -> None:
    push_driver(tmp_path, registry.host, K1, big_lib_bytes=4096)
    name = f"{registry.host}/{REPO}:{tag(K1)}"
    path = tmp_path / f"image.{kind}.tar"
    skopeo_copy(f"docker://{name}", f"{kind}:{path}:{name}")
    good = tmp_path / "good.tar"
    good.write_bytes(path.read_bytes())
    flipped = _flip_in_largest(path)

    out = host.agent("import", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "refused" in out.stderr and says in out.stderr and flipped in out.stderr, out.stderr
    assert imported_names(host) == [] and stored_blobs(host) == [], "a refused import keeps nothing"

    assert host.agent("import", str(good)).returncode == 0, "the untouched archive imports"
    assert imported_names(host) == [name]


def test_import_names_and_removal(tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    """--as names the one image; --remove forgets it and the blobs only it used."""
    push_driver(tmp_path, registry.host, K1)
    src = f"{registry.host}/{REPO}:{tag(K1)}"
    path = tmp_path / "image.oci.tar"
    skopeo_copy(f"docker://{src}", f"oci-archive:{path}:whatever")
    other = f"{registry.host}/{REPO}:renamed"
    for bad in (f"{other}@sha256:{'ab' * 32}", f"{registry.host}/{REPO}"):  # a digest, or no tag: no name to find
        out = host.agent("import", "--as", bad, str(path))
        assert out.returncode == 64 and "name the image with a tag" in out.stderr, out.stderr
    assert host.agent("import", "--as", other, str(path)).returncode == 0
    assert imported_names(host) == [other]
    assert len(stored_blobs(host)) == 3  # manifest, config, one layer
    assert host.agent("import", "--remove", src).returncode == 1  # not imported under that name
    out = host.agent("import", "--remove", other)
    assert out.returncode == 0, out.stderr
    assert imported_names(host) == [] and stored_blobs(host) == []
    not_an_archive = tmp_path / "notes.txt"
    not_an_archive.write_text("hello\n" * 200)
    out = host.agent("import", str(not_an_archive))
    assert out.returncode == 1 and "refused" in out.stderr, out.stderr


def test_mirrors_are_tried_in_order_and_the_origin_last(tmp_path: Path, registry: RegistryServer,
                                                        host: Host) -> None:
    """First mirror down, second serving other bytes for the pinned digest, origin good: installed from the
    origin, with a warning for each mirror; each was asked once for the manifest, the origin served all."""
    digest = push_driver(tmp_path, registry.host, K1)
    down = f"127.0.0.1:{free_port()}"
    with FlakyProxy(registry.host, faults=(Fault.corrupt(offset=20, when=manifests),)) as liar, \
            FlakyProxy(registry.host) as origin:
        hosts = [down, liar.host, origin.host]
        host.configure(origin.host, plain_http=False,
                       image=(f'plain_http = {json.dumps(hosts)}\nmirrors = {json.dumps(hosts[:2])}\n'
                              f'attempts = 1\npins = {{"{tag(K1)}" = "{digest}"}}\n'))
        run = host.once()
        assert run.returncode == 0, run.stdout + run.stderr
        warnings = [line for line in run.stdout.splitlines() if "mirror_skipped" in line]
        assert len(warnings) == 2, run.stdout
        assert down in warnings[0] and "unreachable" in warnings[0]
        assert liar.host in warnings[1] and "came back with digest" in warnings[1]
        assert [s.path for s in liar.seen] == [f"/v2/{REPO}/manifests/{digest}"]
        assert any("/blobs/" in s.path for s in origin.seen)
    assert host.current() == f"{DRIVER}/ubuntu-22.04-{K1}"


def test_a_pinned_digest_refuses_any_other_image(tmp_path: Path, registry: RegistryServer, host: Host) -> None:
    """The tag now names another image than the pinned one: nothing is installed, current untouched."""
    push_driver(tmp_path, registry.host, K1)
    other = "sha256:" + "ab" * 32
    host.configure(registry.host, image=f'attempts = 1\npins = {{"{tag(K1)}" = "{other}"}}\n')
    run = host.once()
    assert run.returncode != 0
    assert other in run.stdout + run.stderr, run.stdout + run.stderr
    assert host.current() is None and host.debris() == []


def test_an_imported_image_that_is_not_the_pinned_one_is_refused(tmp_path: Path, registry: RegistryServer,
                                                                 host: Host) -> None:
    push_driver(tmp_path, registry.host, K1)
    name = f"{registry.host}/{REPO}:{tag(K1)}"
    path = tmp_path / "image.oci.tar"
    skopeo_copy(f"docker://{name}", f"oci-archive:{path}:{tag(K1)}")
    registry.stop()
    assert host.agent("import", str(path)).returncode == 0
    other = "sha256:" + "cd" * 32
    host.configure(registry.host, image=f'attempts = 1\npins = {{"{tag(K1)}" = "{other}"}}\n')
    run = host.once()
    assert run.returncode != 0 and host.current() is None
    assert "not the pinned" in run.stdout + run.stderr, run.stdout + run.stderr
