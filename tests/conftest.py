"""Shared test set-up: a guard against unplanned subprocesses, and small builders."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

FIXTURES = Path(__file__).parent / "fixtures"
pytest_plugins = ["support.registry", "support.sandbox"]  # `registry_server`; `tools`, `registry`, `host`


class UnexpectedSubprocess(BaseException):
    """A unit test started a program it did not declare (cloud-init's guard)."""


@pytest.fixture(autouse=True)
def _no_unplanned_subprocess(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Unit tests run no programs unless marked `integration` or `subprocess`."""
    if request.node.get_closest_marker("integration") or request.node.get_closest_marker("subprocess"):
        yield
        return
    def refuse(self: subprocess.Popen[bytes], args: object, *a: object, **kw: object) -> None:
        raise UnexpectedSubprocess(f"unit test tried to run {args!r}; mark it integration or subprocess")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)  # undone by monkeypatch after the test
    yield


@pytest.fixture(autouse=True)
def _structlog_restored() -> Iterator[None]:
    """A test that configures logging (log.configure binds the captured stdout of that test) leaves
    the configuration as it found it: a later test must not write to a closed stream."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path
