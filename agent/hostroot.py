"""The host root every host path hangs off: `/` on the host, `/host` in a container, a temp dir in tests."""

from __future__ import annotations

import os
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

    def resolve(self, host_path: str, max_links: int = 40) -> str:
        """`host_path` with every symlink in it resolved as the host would, never leaving the root.

        An absolute link target means the host's root (not this process's), so `/lib64 ->
        usr/lib64` and `/lib64 -> /usr/lib64` both give `/usr/lib64`. Missing parts are kept.
        """
        done: list[str] = []
        todo = list(PurePosixPath(host_path).parts[1:])
        links = 0
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                continue
            local = self.root.joinpath(*done, part)
            if local.is_symlink() and links < max_links:
                links += 1
                target = os.readlink(local)
                if target.startswith("/"):
                    done = []
                todo = [p for p in target.split("/") if p] + todo
                continue
            done.append(part)
        return "/" + "/".join(done)

    def host_view(self, local: Path) -> str:
        """The host's name for a local path under the root (inverse of __call__)."""
        return "/" + str(local.relative_to(self.root)) if local != self.root else "/"
