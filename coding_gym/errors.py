"""Exceptions raised by coding_gym.

Every exception subclasses :class:`gymnasium.error.Error`, so code that already handles
Gymnasium errors handles ours too.
"""

from __future__ import annotations

from gymnasium.error import Error


class CodingGymError(Error):
    """Base class of every coding_gym exception."""


class InvalidAction(CodingGymError, TypeError):
    """The action is not Python source text (for example bytes, None or a number)."""


class BackendError(CodingGymError):
    """The execution backend could not run the code: infrastructure, not the agent's fault.

    The env turns it into ``truncated=True`` with ``info["infra_error"]`` set, never into reward.
    """


class ServerError(BackendError):
    """A coding_gym or OpenEnv server answered a request with an error message.

    ``code`` is the protocol's error code, for example ``"VALIDATION_ERROR"`` or
    ``"CAPACITY_REACHED"``.
    """

    def __init__(self, message: str, code: str) -> None:
        super().__init__(f"{message} [{code}]")
        self.code = code


class WorkerStartError(BackendError):
    """The sandbox worker process could not be started."""


class ContainerStartError(BackendError):
    """A server container exited, or did not answer ``/health`` in time; the message holds
    its last log lines."""


class SnapshotError(BackendError):
    """An interpreter could not be snapshotted, restored or forked (for example when its
    process limit leaves no room for the copy), or the backend has no snapshots."""


class SharedMemoryUnsupported(CodingGymError, ValueError):
    """A text space was asked to live in shared memory, which cannot hold variable-length text."""
