"""The contract every backend keeps (local subprocess, remote server, Docker container)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from coding_gym.models import ExecResult


@runtime_checkable
class Backend(Protocol):
    """Runs an episode's code in one persistent interpreter.

    - :meth:`reset` discards the interpreter and starts a fresh one (a new episode).
    - :meth:`run` executes code in it; variables persist between calls until the next reset.
      Agent-side failures (exceptions, timeouts, crashes) come back inside the
      :class:`ExecResult`; only infrastructure failures raise :class:`BackendError`.
    - :meth:`close` releases everything; calling it twice is safe.
    """

    def reset(self) -> None: ...

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult: ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
