"""The driver's tools on PATH: links through `current`, never over a name the agent does not own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import HostError
from agent.tools import TOOLS, LinkChanges, apply_links, bin_dir_for, plan_links, read_links, tools_in

ROOT = "/opt/nvidia"


def ours(tool: str) -> str:
    return f"{ROOT}/current/bin/{tool}"


def test_bin_dir_auto_is_opt_bin_on_flatcar_and_usr_local_bin_elsewhere() -> None:
    assert bin_dir_for("auto", "flatcar") == "/opt/bin"
    assert bin_dir_for("auto", "fedora-coreos") == "/usr/local/bin"
    assert bin_dir_for("", "flatcar") is None
    assert bin_dir_for("/srv/bin", "ubuntu") == "/srv/bin"


# what a tool's path may hold: nothing, a file, our link (right or stale), a foreign link
HELD = st.sampled_from([None, "", "ours", f"{ROOT}/535.1/x/bin/t", "/usr/bin/nvidia-smi", "../lib/x"])


@given(st.dictionaries(st.sampled_from(TOOLS), HELD), st.none() | st.frozensets(st.sampled_from(TOOLS)))
def test_links_converge_and_never_touch_what_is_not_ours(held: dict[str, str | None],
                                                       present: frozenset[str] | None) -> None:
    found = {tool: ours(tool) if value == "ours" else value for tool, value in held.items()}
    changes = plan_links(ROOT, present, found)
    touched = {t for t, _ in changes.make} | set(changes.remove)
    foreign = {t for t, v in found.items() if v is not None and v != ours(t)}  # only its own exact links
    assert not touched & foreign
    assert set(changes.foreign) == foreign & (present or frozenset())
    after = dict(found) | dict(changes.make) | dict.fromkeys(changes.remove)
    for tool in set(TOOLS) - foreign:
        assert after.get(tool) == (ours(tool) if present and tool in present else None), (tool, changes)
    assert not plan_links(ROOT, present, after)  # once applied, nothing is left to do


def test_tools_in_counts_executable_files_only(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, mode in (("nvidia-smi", 0o755), ("nvidia-modprobe", 0o644), ("not-a-tool", 0o755)):
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(mode)
    (bin_dir / "nvidia-persistenced").symlink_to("/bin/true")
    assert tools_in(tmp_path) == {"nvidia-smi"}


def test_apply_makes_replaces_and_removes_only_planned_links(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-debugdump").write_text("a distribution's copy\n")
    os.symlink(f"{ROOT}/535.1/x/bin/nvidia-persistenced", bin_dir / "nvidia-persistenced")  # an operator's
    os.symlink(ours("nvidia-modprobe"), bin_dir / "nvidia-modprobe")
    changes = plan_links(ROOT, frozenset({"nvidia-smi", "nvidia-debugdump", "nvidia-persistenced"}),
                         read_links(bin_dir))
    assert changes == LinkChanges(make=(("nvidia-smi", ours("nvidia-smi")),), remove=("nvidia-modprobe",),
                                  foreign=("nvidia-persistenced", "nvidia-debugdump"))
    apply_links(bin_dir, changes)
    assert os.readlink(bin_dir / "nvidia-smi") == ours("nvidia-smi")
    assert not (bin_dir / "nvidia-modprobe").exists()
    assert (bin_dir / "nvidia-debugdump").read_text() == "a distribution's copy\n"
    assert os.readlink(bin_dir / "nvidia-persistenced") == f"{ROOT}/535.1/x/bin/nvidia-persistenced"
    assert sorted(p.name for p in bin_dir.iterdir()) == ["nvidia-debugdump", "nvidia-persistenced", "nvidia-smi"]


def test_a_link_that_cannot_be_renamed_leaves_no_temporary(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    (bin_dir / "nvidia-smi").mkdir(parents=True)  # rename of a link over a directory fails (EISDIR)
    (bin_dir / "nvidia-smi" / "x").write_text("")
    with pytest.raises(HostError):
        apply_links(bin_dir, LinkChanges(make=(("nvidia-smi", ours("nvidia-smi")),)))
    assert sorted(p.name for p in bin_dir.iterdir()) == ["nvidia-smi"]


def test_an_unwritable_bin_dir_says_what_to_set(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(HostError, match="cannot link the driver's tools") as caught:
        apply_links(blocker / "bin", LinkChanges(make=(("nvidia-smi", ours("nvidia-smi")),)))
    assert caught.value.hint
