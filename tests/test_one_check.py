"""Every source goes through the one blob check (issue 10): `agent.fetch.manifest.check_blob`.

The same driver image is installed in-process from each source — the registry (through the content
store), a mirror, the docker engine (a real dockerd's export), an imported oci-archive and an imported
docker-archive (made by skopeo) — with a spy on check_blob wherever it is called from. Each install
must have checked every one of its layers there, and a layer altered in the imported store must be
caught there.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.errors import DigestMismatch
from agent.fetch import archive, manifest, store
from agent.fetch import registry as registry_module
from agent.fetch.engine import EngineSource
from agent.fetch.imported import ImageStore
from agent.fetch.manifest import Platform
from agent.fetch.registry import RegistryClient
from agent.fetch.sources import ImageSource, RegistrySource
from agent.fetch.store import BlobStore
from agent.install.image import Want, install_image
from agent.reference import Reference
from support.engine import Engine, engine  # noqa: F401 - the fixture
from support.registry import RegistryServer
from support.sandbox import DRIVER, K1, REPO, push_driver, tag

pytestmark = [pytest.mark.integration, pytest.mark.subprocess]

AMD64 = Platform("linux", "amd64")
WANT = Want(DRIVER, f"ubuntu-22.04-{K1}", K1, ("lib*",))


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The digests check_blob was asked about, wherever in agent.fetch it is called from."""
    seen: list[str] = []
    real = manifest.check_blob

    def spy(size: int, digest: str, desc: manifest.Descriptor, what: str) -> None:
        seen.append(desc.digest)
        real(size, digest, desc, what)

    for module in (manifest, archive, registry_module, store):
        monkeypatch.setattr(module, "check_blob", spy)
    yield seen


def install(source: ImageSource, ref: Reference, root: Path) -> Any:
    return install_image(source, ref, platform=AMD64, install_root=root, tree=root / "tree", want=WANT,
                         on_phase=lambda _n, _c: None)


def skopeo(src: str, dest: str) -> None:
    subprocess.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", src, dest], check=True, timeout=120)


def test_every_source_checks_every_layer_in_the_one_place(tmp_path: Path, registry: RegistryServer,
                                                          engine: Engine,  # noqa: F811
                                                          checked: list[str]) -> None:
    push_driver(tmp_path, registry.host, K1)
    ref = Reference(registry.host, REPO, tag(K1))

    imported = ImageStore(tmp_path / "images")
    skopeo(f"docker://{ref}", f"oci-archive:{tmp_path / 'oci.tar'}:{tag(K1)}")
    skopeo(f"docker://{ref}", f"docker-archive:{tmp_path / 'docker.tar'}:{registry.host}/other/driver:{tag(K1)}")
    imported.import_path(tmp_path / "oci.tar", AMD64, default=ref, as_ref=None)
    imported.import_path(tmp_path / "docker.tar", AMD64, default=None, as_ref=None)
    assert engine.client is not None
    engine.client.images.pull(f"{registry.host}/{REPO}", tag=tag(K1))
    (tmp_path / "sock").symlink_to(engine.socket)

    sources: list[tuple[str, ImageSource, Reference]] = [
        ("registry", RegistrySource(RegistryClient(plain_http=[registry.host]), BlobStore(tmp_path / "cache")), ref),
        ("mirror", RegistrySource(RegistryClient(plain_http=[registry.host]), BlobStore(tmp_path / "cache"),
                                  mirror=registry.host),
         Reference("origin.invalid", REPO, tag(K1))),
        ("engine", EngineSource(tmp_path / "sock", BlobStore(tmp_path / "cache"), pull=False), ref),
        ("oci-archive", imported, ref),
        ("docker-archive", imported, Reference(registry.host, "other/driver", tag(K1))),
    ]
    for n, (name, source, wanted) in enumerate(sources):
        checked.clear()
        result = install(source, wanted, tmp_path / f"root-{n}")
        layers = [d.digest for d in result.image.layers]
        assert layers and set(layers) <= set(checked), f"{name}: layers not checked by check_blob: {checked}"
        assert result.image.config.digest in checked, f"{name}: its config was not checked"

    stored = imported.blobs.path(layers[0])  # the docker-archive's one layer, altered where it is kept
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    checked.clear()
    with pytest.raises(DigestMismatch, match="does not match its digest"):
        install(imported, Reference(registry.host, "other/driver", tag(K1)), tmp_path / "root-tampered")
    assert layers[0] in checked
    engine.client.images.remove(f"{ref}", force=True)
