"""The agent's error types: what failed, in which context, and whether a retry can help."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit statuses scripts and systemd can rely on.

    The unit lists CONFIG in RestartPreventExitStatus= so a bad config file
    does not restart-loop.
    """

    OK = 0
    FAILED = 1
    DEGRADED = 2
    USAGE = 64  # EX_USAGE
    UNAVAILABLE = 69  # EX_UNAVAILABLE: the daemon is not running to ask
    LOCKED = 75  # EX_TEMPFAIL: another daemon holds the lock
    CONFIG = 78  # EX_CONFIG


class AgentError(Exception):
    """An error with a message an operator can act on.

    `hint` says what to do about it; `transient` says whether the same
    action may succeed later without anybody changing anything.
    """

    transient = False

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class TransientError(AgentError):
    """Worth retrying with backoff: the network, a registry 5xx, a busy resource."""

    transient = True


class ConfigError(AgentError):
    """A configuration file is invalid: names the file, the key and what is valid."""

    def __init__(self, file: str, key: str | None, problem: str, valid: str | None = None) -> None:
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {problem}", hint=f"valid: {valid}" if valid else None)
        self.file = file
        self.key = key


class RegistryError(AgentError):
    """The registry answered, but not with what we need (missing tag, denied, bad manifest)."""


class ImageMissing(RegistryError):
    """The registry answered 404: no such tag, manifest or blob (yet)."""


class RegistryUnavailable(TransientError):
    """The registry could not be reached or failed on its side (connection, timeout, 5xx, 429)."""


class DigestMismatch(AgentError):
    """Content did not match the digest that named it: never installed."""


class ImageRejected(AgentError):
    """The image breaks the driver-image contract or tries to escape its tree."""


class KernelMismatch(ImageRejected):
    """The image was built for another kernel than the one running."""


class Cancelled(AgentError):
    """The agent is stopping: the pull or install in progress is abandoned, nothing is left half-done."""


class HostError(AgentError):
    """An action on the host failed (mount, ldconfig, filesystem)."""


def cause_chain(exc: BaseException) -> list[str]:
    """The messages of `exc` and its causes, outermost first, each once."""
    chain: list[str] = []
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        text = (cur.message if isinstance(cur, AgentError) else str(cur)) or type(cur).__name__
        if not chain or chain[-1] != text:
            chain.append(text)
        cur = cur.__cause__ or (None if cur.__suppress_context__ else cur.__context__)
    return chain
