"""Preflight: does an image for a given OS version and kernel exist, and does it verify?

For an update pipeline or a cluster tool, before an OS release is rolled out to GPU nodes: the
image is resolved, pulled and verified exactly as an install would (digests, the manifest's
files, every module's vermagic against *that* kernel), in a scratch directory that is removed
afterwards. Nothing on the host changes.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.errors import HostError
from agent.fetch.manifest import Platform
from agent.fetch.sources import ImageSource
from agent.fetch.store import BlobStore
from agent.install.image import InstallResult, Want, install_image
from agent.plan import Target


def check_image(sources: Callable[[BlobStore], ImageSource], target: Target, *, platform: Platform,
                lib64_allow: tuple[str, ...], workdir: Path, on_phase: Callable[[str, dict[str, Any]], None],
                cancelled: Callable[[], bool] = lambda: False) -> InstallResult:
    """Resolve, pull and verify `target`'s image under a scratch directory in `workdir`; removed after.
    `sources` makes the image sources with a download cache in that scratch directory.

    Raises what an install raises: RegistryUnavailable, ImageNotFound, ImageRejected, ...
    """
    try:
        scratch = Path(tempfile.mkdtemp(prefix="nvidia-agent-preflight-", dir=workdir))
    except OSError as exc:
        raise HostError(f"cannot make a scratch directory in {workdir}: {exc.strerror}",
                        hint="name a writable directory with room for one driver image: --workdir DIR") from None
    try:
        return install_image(sources(BlobStore(scratch / "blobs")), target.reference, platform=platform,
                             install_root=scratch, tree=scratch / "tree",
                             want=Want(target.driver, target.os_key, target.kernel, lib64_allow),
                             on_phase=on_phase, cancelled=cancelled)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
