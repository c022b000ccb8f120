"""The host root every host path hangs off: `/` on the host, `/host` in a container, a temp dir in tests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath


def check_host_path(value: str) -> PurePosixPath:
    """A host path from config or state: absolute, normalized, no `..`. Raises ValueError."""
    path = PurePosixPath(value)
    if not path.is_absolute():
        raise ValueError(f"{value!r} is not an absolute path")
    if ".." in path.parts or (str(path) != value.rstrip("/") and value != "/"):
        raise ValueError(f"{value!r} is not a normalized path (no '..', '.', '//' or trailing '/')")
    return path


@dataclass(frozen=True)
class HostRoot:
    """Maps host paths (as the host sees them) to paths this process can open."""

    root: Path = Path("/")

    def __call__(self, host_path: str | PurePosixPath) -> Path:
        path = PurePosixPath(host_path)
        if not path.is_absolute():
            raise ValueError(f"host path {str(host_path)!r} must be absolute")
        return self.root.joinpath(*path.parts[1:])

    def host_view(self, local: Path) -> str:
        """The host's name for a local path under the root (inverse of __call__)."""
        return "/" + str(local.relative_to(self.root)) if local != self.root else "/"
