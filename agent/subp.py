"""The one door for subprocesses: argv lists, a timeout, captured output, errors with context."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.errors import HostError

DEFAULT_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Completed:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class SubpError(HostError):
    """A command failed or timed out; carries argv, exit code and both outputs."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stdout: str, stderr: str) -> None:
        status = "timed out" if returncode is None else f"exited {returncode}"
        detail = (stderr or stdout).strip().splitlines()
        tail = f": {detail[-1]}" if detail else ""
        super().__init__(f"`{' '.join(argv)}` {status}{tail}")
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr


def host_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a host program: `base` (default: the agent's own), less what a frozen
    runtime changed. PyInstaller's launcher puts its bundle first on LD_LIBRARY_PATH (the
    caller's value kept in LD_LIBRARY_PATH_ORIG): a host `mount` or `modprobe` must load the
    host's libraries, not the bundle's copies built for another host."""
    env = dict(os.environ if base is None else base)
    if getattr(sys, "frozen", False):
        original = env.pop("LD_LIBRARY_PATH_ORIG", None)
        if original:
            env["LD_LIBRARY_PATH"] = original
        else:
            env.pop("LD_LIBRARY_PATH", None)
    return env


def run(
    argv: Sequence[str],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input_text: str | None = None,
) -> Completed:
    """Run `argv` (never through a shell) and return its outputs.

    Raises SubpError on a non-zero exit (when `check`), on a timeout, or when
    the program cannot be started.
    """
    argv = tuple(argv)
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            env=host_env(env),
            input=input_text,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise SubpError(argv, None, _text(exc.stdout), _text(exc.stderr)) from None
    except OSError as exc:
        raise SubpError(argv, 127, "", str(exc)) from exc
    done = Completed(argv, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise SubpError(argv, proc.returncode, proc.stdout, proc.stderr)
    return done


def spawn(argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> int:
    """Start a daemon detached (own session, no inherited stdio) and return its PID without waiting."""
    try:
        proc = subprocess.Popen(
            tuple(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, env=host_env(env), close_fds=True)
    except OSError as exc:
        raise SubpError(tuple(argv), 127, "", str(exc)) from exc
    return proc.pid


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
