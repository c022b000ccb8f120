"""The one door for subprocesses: argv lists, a timeout, captured output, errors with context."""

from __future__ import annotations

import subprocess
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
            env=dict(env) if env is not None else None,
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
            start_new_session=True, env=dict(env) if env is not None else None, close_fds=True)
    except OSError as exc:
        raise SubpError(tuple(argv), 127, "", str(exc)) from exc
    return proc.pid


def _text(data: bytes | str | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")
