"""Named fail points at the install's checkpoints, armed only by an environment variable, for crash tests.

    NVIDIA_AGENT_FAILPOINTS="install.renamed"          SIGKILL the agent the first time it gets there
    NVIDIA_AGENT_FAILPOINTS="fetch.chunk=kill@3"       ... the third time
    NVIDIA_AGENT_FAILPOINTS="install.synced=error"     raise an OSError(EIO) there instead

The test matrix (tests/test_crash.py) kills the agent at every point in POINTS and proves the
next run converges: `current` always names a complete tree and no debris survives. Unset, a
fail point is one dictionary lookup.
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "NVIDIA_AGENT_FAILPOINTS"

# Every checkpoint of an install and activation, in the order a first install meets them.
POINTS = (
    "fetch.chunk",  # a blob chunk is written to its .partial file
    "fetch.complete",  # a blob is verified and renamed into the content store
    "install.layer",  # a layer is extracted into staging
    "install.verified",  # the staging tree passed verification
    "install.marker",  # the tree marker is written inside staging
    "install.synced",  # the staging tree is on disk (syncfs)
    "install.renamed",  # the tree is renamed (or exchanged) into place
    "current.link",  # the new `current` symlink exists under a temporary name
    "current.switched",  # `current` names the new tree
    "state.written",  # state.json is replaced
    "prune.trashed",  # an old tree is renamed to trash before removal
)


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    armed: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        what, _, nth = (action or "kill").partition("@")
        armed[name] = (what, int(nth) if nth.isdigit() else 1)
    return armed


_armed = _parse(os.environ.get(ENV, ""))
_hits: dict[str, int] = {}


def hit(name: str) -> None:
    """Reached checkpoint `name`: die or fail here if a test armed it."""
    if not _armed:
        return
    action = _armed.get(name)
    if action is None:
        return
    _hits[name] = _hits.get(name, 0) + 1
    what, nth = action
    if _hits[name] != nth:
        return
    if what == "error":
        raise OSError(errno.EIO, f"fail point {name}")
    os.kill(os.getpid(), signal.SIGKILL)
