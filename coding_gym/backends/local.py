"""``LocalBackend``: the episode's code runs in a worker process on this machine."""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from coding_gym.backends.ahead import NextInterpreter
from coding_gym.backends.episode import Episode, Home, Snapshot
from coding_gym.backends.workers import StartMethod, WorkerStarter
from coding_gym.errors import BackendError, SnapshotError, WorkerStartError
from coding_gym.models import ExecResult, Isolation, Limits
from coding_gym.sandbox import steps
from coding_gym.sandbox.startup import once
from coding_gym.sandbox.steps import StepRun
from coding_gym.sandbox.supervisor import WorkerProcess

logger = logging.getLogger(__name__)

#: A wait before a step's code starts that is too short to count against its time limit:
#: only a fresh interpreter's start, or a busy server, takes longer.
UNCOUNTED_WAIT_S = 0.01
_monotonic = time.monotonic
#: One item per thread inside run(). A worker follows its caller only while no other thread
#: steps at the same time (see sandbox/affinity.py): workers stepped from several threads at
#: once must spread over the CPUs.
_RUNNING: list[None] = []
_ROLLED_BACK_NOTE = ("[coding_gym] the step was rolled back: the interpreter is as it was "
                     "before it.\n")


class LocalBackend:
    """One persistent sandbox worker per episode, limited from inside and from outside.

    Args:
        limits: Resource limits of every step (:class:`coding_gym.Limits`).
        isolation: Isolation layers around the worker (:class:`coding_gym.models.Isolation`,
            or a dict of its fields such as ``{"network": False}``); all on by default.
            Layers the machine does not allow are skipped with a warning, and
            :meth:`describe` says which are active and why the others are not.
        start_method: ``"zygote"`` (default): each worker is forked from a warmed-up parent
            that has already imported ``preload``, so a reset costs a few milliseconds;
            ``"spawn"``: each worker is a fresh interpreter (40-130 ms). The zygote falls
            back to spawning, with a warning, where it cannot run.
        preload: Modules the zygote imports once for all workers (default: ``numpy`` if it
            is installed). The zygote is shared by every backend of the process with the same
            ``preload``. Workers start with these modules in memory (and in their address
            space, which ``memory_mb`` bounds), not imported into their namespace.
        transactional: Roll the interpreter back to its state before the step when a step
            times out or dies (``state_lost`` stays False, ``info["rolled_back"]`` is True).
            Each step then forks the interpreter first: about a millisecond more per step.
        start_ahead: After each reset, start the next episode's interpreter in the background
            (:mod:`coding_gym.backends.ahead`), so that the next reset only swaps it in: well
            under a millisecond instead of 3-5 ms, for a second idle interpreter (~4 MB).

    Example:
        >>> with LocalBackend() as backend:
        ...     backend.reset()
        ...     _ = backend.run("x = 2")
        ...     print(backend.run("print(x * 21)").stdout, end="")
        42
    """

    def __init__(self, limits: Limits | None = None,
                 isolation: Isolation | Mapping[str, bool] | None = None, *,
                 start_method: StartMethod = "zygote", preload: Sequence[str] | None = None,
                 transactional: bool = False, start_ahead: bool = True) -> None:
        if start_method not in ("zygote", "spawn"):
            raise ValueError(
                f"start_method must be 'zygote' or 'spawn', got {start_method!r}"
            )
        if isinstance(preload, str):
            raise TypeError(f"preload must be a list of module names, got the str {preload!r}")
        self.limits = limits or Limits()
        self.isolation = Isolation.coerce(isolation)
        self.start_method: StartMethod = start_method
        self.preload = None if preload is None else tuple(preload)
        self.transactional = bool(transactional)
        self._workers = WorkerStarter(self.limits, self.isolation, start_method, self.preload)
        self._episode = Episode()
        self._next = NextInterpreter(LocalBackend(
            self.limits, self.isolation, start_method=start_method, preload=preload,
            start_ahead=False)) if start_ahead else None
        self._closed = False
        # Kill the workers even if the caller never closes: no process may outlive the env.
        self._finalizer = weakref.finalize(self, _release, self._episode, self._next)

    @property
    def start_ahead(self) -> bool:
        """Whether the next episode's interpreter is started ahead (see ``start_ahead``)."""
        return self._next is not None

    @property
    def workdir(self) -> str | None:
        """The episode's working directory (removed on reset and close, once no snapshot or
        fork of the interpreter uses it)."""
        home = self._episode.home
        return home.path if home is not None else None

    @property
    def worker_pid(self) -> int | None:
        """Pid of the live worker, if any."""
        worker = self._episode.worker
        return worker.pid if worker is not None and worker.alive else None

    def reset(self) -> None:
        """Discard the interpreter and its directory; start a fresh worker.

        With ``start_ahead``, the fresh worker is the one started ahead: the old episode's
        processes stop at once, and are killed, with its directory removed, in the
        background while the next one starts.
        """
        self._check_open()
        episode = self._episode
        ahead = self._next
        if ahead is not None and ahead.trade(episode):
            assert episode.worker is not None
            # Its start-up was noted (and any missing layer warned of) by the hidden backend.
            self._workers.report = episode.worker.isolation
            ahead.start_soon()
            return
        old_home = episode.stop_interpreter()
        # The old directory and uid go while the new worker starts (or if it cannot).
        release_old_home = once(old_home.release if old_home is not None else None)

        def meanwhile() -> None:
            release_old_home()
            if episode.next_home is None and ahead is None:
                try:
                    episode.next_home = Home.make(self.isolation.user)
                except OSError:
                    pass  # the next reset makes its own, and says why it cannot

        try:
            home = episode.next_home or Home.make(self.isolation.user)
            episode.home, episode.next_home = home, None
            episode.worker = self._workers.start(episode, meanwhile)
        finally:
            release_old_home()
        if ahead is not None:
            ahead.start_soon()

    def prepare(self) -> None:
        """Start the episode's interpreter now if the last step killed it (a no-op otherwise,
        and before the first reset): the next step then finds it ready. A server calls it
        once a killed step's reply is on its way, so that the new worker starts while the
        client reads the reply and thinks."""
        self._check_open()
        if self._episode.home is not None:
            self._live_worker()  # returns the worker at once if it is alive

    def run(self, code: str, *, timeout_s: float | None = None,
            asked_at: float | None = None) -> ExecResult:
        """Run ``code`` in the episode's interpreter.

        After a hard kill (timeout, crash, out of memory) the result says ``state_lost``; the
        next call runs in a fresh interpreter in the same working directory. With
        ``transactional``, the interpreter is rolled back instead.

        The time limit counts from ``asked_at`` (``time.monotonic()``; default: now), so that
        a step returns within it (plus the hard-kill grace) even when it first waits for a
        fresh interpreter: the code gets what is left. A wait under
        :data:`UNCOUNTED_WAIT_S` is not counted.
        """
        _RUNNING.append(None)  # list.append and pop are atomic: no lock for the count
        try:
            step = self._begin(code, timeout_s, asked_at, follow=len(_RUNNING) == 1)
            return self.finish(step, step.wait())
        finally:
            _RUNNING.pop()

    def begin(self, code: str, *, timeout_s: float | None = None,
              asked_at: float | None = None) -> StepRun:
        """Send ``code`` to the worker without waiting: the first half of :meth:`run`. Drive
        the step with :func:`coding_gym.sandbox.fanout.run_many` (which can drive steps of
        many backends at once), then pass it with its result to :meth:`finish`."""
        return self._begin(code, timeout_s, asked_at, follow=False)

    def _begin(self, code: str, timeout_s: float | None, asked_at: float | None, *,
               follow: bool) -> StepRun:
        """:meth:`begin`; ``follow``: the calling thread waits for the step itself, as in
        :meth:`run`, so the worker may wait on its CPU (:mod:`coding_gym.sandbox.affinity`)."""
        worker = self._episode.worker
        if worker is None or not worker.alive or self._closed:
            if asked_at is None:
                asked_at = _monotonic()
            worker = self._live_worker()
        worker.place(follow and not self.transactional)  # its copy forks, as in snapshot()
        limits = self.limits if timeout_s is None else self.limits.with_timeout(timeout_s)
        spent = 0.0 if asked_at is None else _monotonic() - asked_at
        if spent < UNCOUNTED_WAIT_S:
            spent = 0.0
        if not self.transactional:
            return worker.begin(code, limits, spent_s=spent)
        parking = self._workers.parking(self._episode)
        return worker.begin(code, limits, snapshot=True, parking=parking, spent_s=spent)

    def finish(self, step: StepRun, result: ExecResult) -> ExecResult:
        """The second half of :meth:`run`: roll back a failed transactional step."""
        if not self.transactional:
            return result
        result.extra["rolled_back"] = False
        if result.kill_reason is None:
            step.discard_copy()
            return result
        copy = step.take_copy()
        if copy is None:
            if step.snapshot_error:
                result.stderr += f"[coding_gym] no rollback: {step.snapshot_error}\n"
            return result
        episode = self._episode
        replied = episode.worker is not None and episode.worker.alive
        try:
            if episode.worker is not None:
                episode.worker.close()
            episode.worker = None
            episode.worker = self._workers.wake(episode, copy)
        except WorkerStartError as e:
            logger.warning("could not roll the interpreter back: %s", e)
            before, _, _ = result.stderr.rpartition(steps.ROLLED_BACK)
            result.stderr = f"{before}{steps.LOST} (the rollback failed).\n"
            result.state_lost = True
            return result
        finally:
            copy.release()
        if replied:
            result.stderr += _ROLLED_BACK_NOTE
        result.state_lost = False
        result.extra["rolled_back"] = True
        return result

    def snapshot(self) -> Snapshot:
        """Save the interpreter as it is now (variables, imports, random state).

        Files of the working directory are not part of it: the restored interpreter sees the
        directory as it is then. Threads and child processes of the agent's code are not
        copied either. A snapshot is a frozen process sharing memory copy-on-write; with the
        user isolation layer it counts against ``Limits.max_processes`` of the episode's uid.
        """
        worker = self._live_worker()
        worker.place(follow=False)  # its copies fork on every CPU, under the batch policy
        episode = self._episode
        assert episode.home is not None
        copy = worker.snapshot(self._workers.parking(episode))
        snapshot = Snapshot(copy, episode.home.share())
        episode.snapshots.add(snapshot)
        return snapshot

    def restore(self, snapshot: Snapshot) -> None:
        """Replace the interpreter with a new one forked from ``snapshot`` (kept for reuse)."""
        self._check_open()
        if not isinstance(snapshot, Snapshot):
            raise TypeError(f"Expected a Snapshot from snapshot(), got {type(snapshot).__name__}")
        if snapshot.released:
            raise SnapshotError("this snapshot was released; take a new one with snapshot()")
        episode = self._episode
        if not snapshot.copy.park(self._workers.parking(episode)):
            raise SnapshotError("could not restore the snapshot: its frozen process is gone")

        def replace_interpreter() -> None:
            episode.release_interpreter()  # parks the other copies it made
            episode.home = snapshot.home.share()

        try:
            episode.worker = self._workers.wake(episode, snapshot.copy, replace_interpreter)
        except WorkerStartError as e:
            raise SnapshotError(f"could not restore the snapshot: {e}") from e

    def fork(self) -> LocalBackend:
        """A new backend whose interpreter is a copy of this one (copy-on-write).

        The copy shares this episode's working directory; from then on the two interpreters
        are independent. Close the new backend like any other.
        """
        worker = self._live_worker()
        worker.place(follow=False)  # as in snapshot()
        episode = self._episode
        assert episode.home is not None
        clone = LocalBackend(self.limits, self.isolation, start_method=self.start_method,
                             preload=self.preload, transactional=self.transactional,
                             start_ahead=self.start_ahead)
        clone._episode.home = episode.home.share()
        try:
            clone._episode.worker = worker.fork(cgroup=clone._workers.cgroup(clone._episode))
        except WorkerStartError as e:
            clone.close()
            raise SnapshotError(f"could not fork the interpreter: {e}") from e
        clone._workers.report = self._workers.report
        return clone

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
        """What this backend is and which protections are active.

        ``isolation`` maps each layer to ``{"active": bool, "detail": str}``, as the latest
        worker applied it (empty before the first reset). ``start_method`` is how the latest
        worker started: ``"zygote"``, or ``"spawn"`` when asked for or when the zygote could
        not serve.
        """
        worker = self._episode.worker
        started = "zygote" if worker is not None and worker.zygote is not None else "spawn"
        return {
            "backend": "local",
            "limits": vars(self.limits).copy(),
            "isolation": {name: dict(layer) for name, layer in self._workers.report.items()},
            "start_method": started if worker is not None else self.start_method,
            "transactional": self.transactional,
            "start_ahead": self.start_ahead,
        }

    # -- Internals -----------------------------------------------------------------------------

    def _live_worker(self) -> WorkerProcess:
        """The episode's worker; a fresh one (same directory) if the last one died."""
        episode = self._episode
        if episode.worker is not None and episode.worker.alive and not self._closed:
            return episode.worker  # checked first: at every step
        self._check_open()
        if episode.home is None:
            self.reset()
        elif episode.worker is None or not episode.worker.alive:
            if episode.worker is not None:
                episode.worker.close()
            episode.worker = None
            episode.worker = self._workers.start(episode)
        assert episode.worker is not None
        return episode.worker

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError("this LocalBackend is closed; create a new one")

    def close(self) -> None:
        """Kill the worker and everything it started, release the snapshots, and remove the
        working directory."""
        self._closed = True
        self._finalizer()

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _release(episode: Episode, ahead: NextInterpreter | None) -> None:
    if ahead is not None:
        ahead.close()
    episode.release()
