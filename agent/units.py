"""Units: ordering drop-ins that make kubelet and friends wait for the agent's READY."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from agent.state import write_atomic

UNIT_DIR = "/etc/systemd/system"
DROPIN = "50-nvidia-agent.conf"
AGENT_UNIT = "nvidia-agent.service"
MARKER = "# Written by nvidia-agent"


def dropin_text(agent_unit: str = AGENT_UNIT) -> str:
    """Literal values only: systemd expands no variables in these directives."""
    return (f"{MARKER} (units.before); it rewrites or removes this file.\n"
            "[Unit]\n"
            f"Wants={agent_unit}\n"
            f"After={agent_unit}\n")


@dataclass(frozen=True)
class DropinPlan:
    write: tuple[str, ...]  # units whose drop-in is missing or differs
    remove: tuple[str, ...]  # units with our drop-in that are no longer configured


def plan_dropins(configured: tuple[str, ...], existing: dict[str, str]) -> DropinPlan:
    """Pure: `existing` maps unit -> text of our drop-in file found on disk."""
    want = dropin_text()
    write = tuple(u for u in configured if existing.get(u) != want)
    remove = tuple(sorted(u for u, text in existing.items() if u not in configured and text.startswith(MARKER)))
    return DropinPlan(write, remove)


def existing_dropins(unit_dir: Path) -> dict[str, str]:
    found = {}
    if unit_dir.is_dir():
        for d in unit_dir.glob("*.d"):
            f = d / DROPIN
            if f.is_file() and not f.is_symlink():
                found[d.name.removesuffix(".d")] = f.read_text()
    return found


def apply_dropins(unit_dir: Path, configured: tuple[str, ...]) -> DropinPlan:
    """Write and remove drop-ins; returns what changed (the caller reloads systemd if anything did)."""
    plan = plan_dropins(configured, existing_dropins(unit_dir))
    for unit in plan.write:
        write_atomic(unit_dir / f"{unit}.d" / DROPIN, dropin_text().encode())
    for unit in plan.remove:
        (unit_dir / f"{unit}.d" / DROPIN).unlink()
        if not any((unit_dir / f"{unit}.d").iterdir()):
            (unit_dir / f"{unit}.d").rmdir()
    return plan
