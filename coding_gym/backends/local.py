"""``LocalBackend``: the episode's code runs in a worker process on this machine."""

from __future__ import annotations

import shutil
import tempfile
import weakref
from typing import Any

from coding_gym.errors import BackendError
from coding_gym.models import ExecResult, Limits
from coding_gym.sandbox import cgroups
from coding_gym.sandbox.supervisor import WorkerProcess


class _Episode:
    """The worker and working directory of the current episode; released by close or GC."""

    def __init__(self) -> None:
        self.worker: WorkerProcess | None = None
        self.workdir: str | None = None

    def release(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


class LocalBackend:
    """One persistent sandbox worker per episode, limited from inside and from outside.

    Args:
        limits: Resource limits of every step (:class:`coding_gym.Limits`).

    Example:
        >>> with LocalBackend() as backend:
        ...     backend.reset()
        ...     _ = backend.run("x = 2")
        ...     print(backend.run("print(x * 21)").stdout, end="")
        42
    """

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._episode = _Episode()
        self._closed = False
        # Kill the worker even if the caller never closes: no process may outlive the env.
        self._finalizer = weakref.finalize(self, self._episode.release)

    @property
    def workdir(self) -> str | None:
        """The episode's working directory (removed on reset and close)."""
        return self._episode.workdir

    @property
    def worker_pid(self) -> int | None:
        """Pid of the live worker, if any."""
        worker = self._episode.worker
        return worker.pid if worker is not None and worker.alive else None

    def reset(self) -> None:
        """Discard the interpreter and its directory; start a fresh worker."""
        self._check_open()
        self._episode.release()
        self._episode.workdir = tempfile.mkdtemp(prefix="coding-gym-")
        self._episode.worker = WorkerProcess.spawn(self.limits, self._episode.workdir)

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        """Run ``code`` in the episode's interpreter.

        After a hard kill (timeout, crash, out of memory) the result says ``state_lost``; the
        next call runs in a fresh interpreter in the same working directory.
        """
        self._check_open()
        episode = self._episode
        if episode.workdir is None:
            self.reset()
        elif episode.worker is None or not episode.worker.alive:
            if episode.worker is not None:
                episode.worker.close()
            episode.worker = WorkerProcess.spawn(self.limits, episode.workdir)
        assert episode.worker is not None
        return episode.worker.run(code, self.limits.with_timeout(timeout_s))

    def interrupt(self) -> None:
        """Kill the interpreter now, from any thread; a no-op before the first reset.

        A :meth:`run` in progress in another thread returns at once with ``state_lost``
        (killed by ``SIGKILL``), and the run after it starts a fresh interpreter. Servers call
        this when the client of a step has gone away.
        """
        worker = self._episode.worker
        if worker is not None:
            worker.interrupt()

    def describe(self) -> dict[str, Any]:
        """What this backend is and which protections are active."""
        support = cgroups.probe()
        return {
            "backend": "local",
            "limits": vars(self.limits).copy(),
            "cgroup": f"v{support.version}" if support.version else f"off: {support.reason}",
        }

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this LocalBackend is closed; create a new one")

    def close(self) -> None:
        """Kill the worker and everything it started, and remove the working directory."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
