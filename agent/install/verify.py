"""Verify: an extracted tree against the driver-image contract and the running kernel (docs/driver-image.md)."""

from __future__ import annotations

import fnmatch
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import ImageRejected, KernelMismatch
from agent.install.modinfo import ModInfo, ModinfoError, read_modinfo, vermagic_matches
from agent.install.unpack import TREE_PREFIX, ExtractedTree, LinkResolver
from agent.reference import DIGEST_RE

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DriverManifest:
    driver_version: str
    os_id: str
    os_version: str
    kernel_release: str
    modules: tuple[str, ...]
    files: dict[str, str]


def parse_manifest(data: bytes) -> DriverManifest:
    """Parse and type-check manifest.json; anything malformed is an ImageRejected naming the field."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ImageRejected(f"{MANIFEST} is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        doc: Any = json.loads(data)
    except ValueError as exc:
        raise ImageRejected(f"{MANIFEST} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ImageRejected(f"{MANIFEST} must be a JSON object")
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise ImageRejected(f"{MANIFEST}: schema_version {doc.get('schema_version')!r} is not supported",
                            hint=f"this agent reads schema_version {SCHEMA_VERSION}")
    strings = {}
    for key in ("driver_version", "os_id", "os_version", "kernel_release"):
        value = doc.get(key)
        if not isinstance(value, str) or not value:
            raise ImageRejected(f"{MANIFEST}: {key} must be a non-empty string")
        strings[key] = value
    modules = doc.get("modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise ImageRejected(f"{MANIFEST}: modules must be a list of paths")
    files = doc.get("files")
    if not isinstance(files, dict):
        raise ImageRejected(f"{MANIFEST}: files must map paths to sha256 digests")
    for path, digest in files.items():
        if not isinstance(digest, str) or not DIGEST_RE.match(digest):
            raise ImageRejected(f"{MANIFEST}: files[{path!r}] is not a sha256:<hex> digest")
        _check_rel(path)
    for m in modules:
        _check_rel(m)
    return DriverManifest(modules=tuple(modules), files=dict(files), **strings)


def _check_rel(path: str) -> None:
    if path.startswith("/") or ".." in path.split("/") or posixpath.normpath(path) != path:
        raise ImageRejected(f"{MANIFEST}: {path!r} is not a normalized relative path")


@dataclass(frozen=True)
class VerifiedTree:
    manifest: DriverManifest
    modules: tuple[ModInfo, ...]  # in load order
    module_paths: dict[str, str]  # module name -> path relative to the tree


def verify_tree(tree: Path, extracted: ExtractedTree, *, driver_version: str, kernel: str,
                lib64_allow: Sequence[str]) -> VerifiedTree:
    """Check an extracted tree: manifest, every file's digest, lib64's contents, modules' vermagic.

    `extracted` is what the layers actually wrote (digests computed while extracting).
    """
    manifest_digest = extracted.files.get(MANIFEST)
    if manifest_digest is None:
        raise ImageRejected(f"no /{TREE_PREFIX}/{MANIFEST} in the image",
                            hint="build the image per docs/driver-image.md (packaging/build-driver-image)")
    manifest = parse_manifest((tree / MANIFEST).read_bytes())
    if manifest.driver_version != driver_version:
        raise ImageRejected(f"image carries driver {manifest.driver_version}, configured driver is {driver_version}",
                            hint="fix the tag or driver.version")
    if manifest.kernel_release != kernel:
        raise KernelMismatch(f"image was built for kernel {manifest.kernel_release}, this host runs {kernel}",
                             hint="push an image built for the running kernel under the expected tag")
    written = {k: v for k, v in extracted.files.items() if k != MANIFEST}
    missing = sorted(set(manifest.files) - set(written))
    extra = sorted(set(written) - set(manifest.files))
    wrong = sorted(p for p in set(written) & set(manifest.files) if written[p] != manifest.files[p])
    for what, bad in (("listed in the manifest but missing", missing),
                      ("present but not listed in the manifest", extra),
                      ("different from the manifest's digest", wrong)):
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ImageRejected(f"files {what}: {', '.join(bad[:3])}{more}")
    check_lib64(extracted, lib64_allow)
    infos: dict[str, ModInfo] = {}
    paths: dict[str, str] = {}
    for rel in manifest.modules:
        if rel not in written:
            raise ImageRejected(f"module {rel} is not a regular file of the tree")
        try:
            info = read_modinfo(tree / rel)
        except (ModinfoError, OSError) as exc:
            raise ImageRejected(f"module {rel}: {exc}") from None
        if not vermagic_matches(info.vermagic, kernel):
            raise KernelMismatch(f"module {rel} has vermagic {info.vermagic.strip()!r}, this host runs {kernel}",
                                 hint="the image's modules were built for another kernel; rebuild it")
        infos[info.name] = info
        paths[info.name] = rel
    return VerifiedTree(manifest, load_order(infos), paths)


LIB64 = "lib64"


def check_lib64(extracted: ExtractedTree, allow: Sequence[str]) -> None:
    """lib64/ is overlaid onto the host's library directory: only driver libraries may be there.

    Every file and symlink must match an allowed name pattern (so an image cannot shadow the
    host's libc), and every symlink must resolve inside lib64 itself: the overlay resolves
    them from mount.target, where `..` would lead into the host's own directories.
    """
    if LIB64 not in extracted.dirs:
        raise ImageRejected("the tree has no lib64/ directory", hint="see docs/driver-image.md")
    prefix = LIB64 + "/"
    resolver = LinkResolver(extracted.links)
    for rel in sorted((*extracted.files, *extracted.links)):
        if not rel.startswith(prefix):
            continue
        name = rel[len(prefix):]
        if not library_allowed(name, allow):
            raise ImageRejected(
                f"{TREE_PREFIX}/{rel} is not a driver library: only NVIDIA and GLVND libraries may be overlaid "
                "onto the host's library directory", hint="remove it from the image, or add its name to "
                "install.lib64_allow if it truly belongs to the driver")
        if rel in extracted.links:
            resolver.resolve(rel, floor=1)


def library_allowed(name: str, patterns: Sequence[str]) -> bool:
    """Whether a path under lib64 matches one of the glob patterns, component by component
    (a `*` never crosses a `/`)."""
    parts = name.split("/")
    for pattern in patterns:
        pattern_parts = pattern.split("/")
        if len(pattern_parts) == len(parts) and all(
                fnmatch.fnmatchcase(p, q) for p, q in zip(parts, pattern_parts, strict=True)):
            return True
    return False


def load_order(modules: dict[str, ModInfo]) -> tuple[ModInfo, ...]:
    """Dependencies first, from each module's own `depends=`; ties keep name order.

    Dependencies outside the image (drm, i2c_core, ...) come from the host's
    module tree and are not ordered here.
    """
    order: list[ModInfo] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise ImageRejected(f"module dependency cycle: {' -> '.join((*chain, name))}")
        state[name] = 1
        for dep in modules[name].depends:
            if dep in modules:
                visit(dep, (*chain, name))
        state[name] = 2
        order.append(modules[name])

    for name in sorted(modules):
        visit(name, ())
    return tuple(order)
