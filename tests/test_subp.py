"""The one door for subprocesses: what a host program inherits from a frozen agent."""

from __future__ import annotations

import sys

import pytest

from agent import subp


def test_a_frozen_agent_gives_host_programs_the_callers_library_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyInstaller's launcher puts its bundle first on LD_LIBRARY_PATH and keeps the caller's value in
    LD_LIBRARY_PATH_ORIG: `mount` and `modprobe` get the caller's back, or none."""
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    bundled = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/usr/lib/nvidia-agent/runtime"}
    assert subp.host_env(bundled | {"LD_LIBRARY_PATH_ORIG": "/opt/x"}) == {"PATH": "/usr/bin",
                                                                         "LD_LIBRARY_PATH": "/opt/x"}
    assert subp.host_env(bundled) == {"PATH": "/usr/bin"}


def test_an_unfrozen_agent_passes_the_environment_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(sys, "frozen", raising=False)
    env = {"PATH": "/usr/bin", "LD_LIBRARY_PATH": "/opt/lib", "LD_LIBRARY_PATH_ORIG": "/x"}
    assert subp.host_env(env) == env
    monkeypatch.setenv("NVIDIA_AGENT_PROBE", "1")
    assert subp.host_env()["NVIDIA_AGENT_PROBE"] == "1"  # default: the agent's own environment
