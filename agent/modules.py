"""Load: insert the tree's kernel modules in dependency order, idempotently, with configured parameters.

Proven on a real kernel in the QEMU guest (issue 3); this machine's kernel cannot load modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from agent import subp
from agent.driverimage import load_order, parse_manifest
from agent.errors import HostError
from agent.hostfacts import read_modules
from agent.modinfo import read_modinfo


@dataclass(frozen=True)
class LoadStep:
    name: str
    path: Path | None  # None: already loaded at the right version
    parameters: tuple[str, ...]
    host_deps: tuple[str, ...]  # dependencies not in the image, loaded from the host's tree


def plan_loads(tree: Path, loaded: Mapping[str, str], parameters: Mapping[str, tuple[str, ...]]) -> list[LoadStep]:
    """Pure given the files: which modules to insert, in order, and which already run."""
    manifest = parse_manifest((tree / "manifest.json").read_bytes())
    infos = {}
    paths = {}
    for rel in manifest.modules:
        info = read_modinfo(tree / rel)
        infos[info.name] = info
        paths[info.name] = tree / rel
    steps = []
    for info in load_order(infos):
        have = loaded.get(info.name)
        if have is not None and have != info.version:
            holders = _holders(info.name)
            raise HostError(f"module {info.name} {have} is loaded but the tree has {info.version}",
                            hint=f"unload it first (held by {holders})")
        params = parameters.get(info.name, parameters.get(info.name.replace("_", "-"), ()))
        deps = tuple(d for d in info.depends if d not in infos)
        steps.append(LoadStep(info.name, None if have is not None else paths[info.name], params, deps))
    return steps


def _holders(name: str) -> str:
    base = Path("/sys/module") / name
    try:
        refcnt = (base / "refcnt").read_text().strip()
        users = sorted(p.name for p in (base / "holders").iterdir())
    except OSError:
        return "unknown users"
    return f"refcount {refcnt}" + (f", modules {', '.join(users)}" if users else "")


def load_modules(tree: Path, sys_module: Path, parameters: Mapping[str, tuple[str, ...]],
                 run: Callable[..., subp.Completed] = subp.run) -> dict[str, str]:
    """Insert what is missing; returns the loaded versions of the tree's modules."""
    steps = plan_loads(tree, read_modules(sys_module), parameters)
    for step in steps:
        for dep in step.host_deps:
            run(["modprobe", dep])
        if step.path is not None:
            try:
                run(["insmod", str(step.path), *step.parameters])
            except subp.SubpError as exc:
                raise HostError(f"loading {step.name} failed: {exc.stderr.strip() or exc}") from exc
    now = read_modules(sys_module)
    return {s.name: now.get(s.name, "") for s in steps}
