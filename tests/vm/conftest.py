"""VM tier plumbing: the `vm` marker, skipped unless asked for, and the timings summary."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # `from tests.vm import harness` under any pytest entry point
    sys.path.insert(0, str(REPO))


def pytest_configure(config: pytest.Config) -> None:
    # Declared here too so `--strict-markers` accepts it before pyproject lists it.
    config.addinivalue_line("markers", "vm: boots a QEMU guest (tests/vm/run); minutes, root, skipped unless -m vm")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    harness = sys.modules.get("tests.vm.harness")
    if harness is None or not harness.TIMINGS:
        return
    terminalreporter.section("VM timings")
    for label, seconds in harness.TIMINGS:
        terminalreporter.write_line(f"{seconds:7.1f}s  {label}")
    artifacts = os.environ.get("NVIDIA_AGENT_VM_ARTIFACTS_USED")
    if artifacts:
        terminalreporter.write_line(f"what an operator sees, per scenario: {artifacts}")
