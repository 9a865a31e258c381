"""Steps on many workers at once, driven by one ``epoll`` loop (see :class:`StepLoop`).

N workers run at once without a thread or process per worker: the steps are sent, then one
loop reads whichever worker answers first. As in :meth:`StepRun.wait
<coding_gym.sandbox.steps.StepRun.wait>`, only the replies and the workers' deaths wake the
loop for the first :data:`~coding_gym.sandbox.steps.QUIET_S` of a batch; the output pipes are
watched after that.

The loop's thread keeps its scheduling policy. It used to wait as a batch thread
(``SCHED_BATCH``), so that a reply would not preempt the worker that sent it, when every
episode weighed a nice-19 process: with the episodes in one group of their own (see
:mod:`coding_gym.sandbox.cgroups`) that made no difference on an idle machine (8 envs
stepping ``print(1)`` on two CPUs, 15.8k against 15.6k steps/s), and cost 2-13% beside busy
processes (13.4k against 13.7k beside an idle-priority one, 11.4k against 13.1k beside a
normal one): a batch thread, once woken, waits for the scheduler's tick behind them.
"""

from __future__ import annotations

import select
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from coding_gym.models import ExecResult
from coding_gym.sandbox.steps import QUIET_S, StepRun

if TYPE_CHECKING:
    from coding_gym.sandbox.supervisor import WorkerProcess

_EPOLLIN = select.EPOLLIN
_monotonic = time.monotonic


class StepLoop:
    """Drives batches of steps; keep one for a group of workers stepped together.

    Its ``epoll`` set outlives the batch: when a batch runs on the same workers as the one
    before (every step but those that start an episode), nothing is registered again, and
    waiting costs the kernel the fds that are ready, not a walk over every worker's fds as a
    ``poll`` set does: about 3 µs of the parent's 40 µs of CPU per env-step, 8 envs stepping
    ``print(1)`` on a 2-CPU VM. The set is rebuilt whenever the workers change, never
    patched: the number of a closed worker's fd may already be another file's.
    """

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._workers: tuple[WorkerProcess, ...] = ()
        #: fd -> position of its step in the batch (the steps' order follows the workers').
        self._positions: dict[int, int] = {}

    def run(self, runs: Sequence[StepRun]) -> list[ExecResult]:
        """Drive every step to its result; results in the order of ``runs``."""
        if len(runs) == 1:
            return [runs[0].wait()]
        return self._drive(runs)

    def _drive(self, runs: Sequence[StepRun]) -> list[ExecResult]:
        workers = tuple(run.worker for run in runs)
        if self._epoll is None or workers != self._workers:
            self._watch(workers)
        epoll = self._epoll
        assert epoll is not None
        positions = self._positions
        pending = len(runs)
        for run in runs:
            if run.result is not None:  # its worker was gone before the code could be sent
                pending -= 1
        quiet_until = _monotonic() + QUIET_S
        quiet = True
        deadline = min((run.deadline for run in runs if run.result is None), default=0.0)
        while pending:
            now = _monotonic()
            if quiet and now >= quiet_until:
                quiet = False
                self._watch_output(runs)
            if now >= deadline:
                for run in runs:
                    if run.result is None and run.deadline <= now:
                        run.expire()
                        pending -= 1
                deadline = min((run.deadline for run in runs if run.result is None),
                               default=0.0)
                continue
            for fd, _ in epoll.poll((quiet_until if quiet and quiet_until < deadline
                                     else deadline) - now, len(positions)):
                position = positions[fd]
                run = runs[position]
                if run.result is not None:
                    # A worker that already replied woke the loop (it died, or its code left
                    # something running that writes): forget it until the set is rebuilt.
                    self._forget(fd)
                    continue
                run.on_event(fd)
                if run.result is not None:
                    pending -= 1
        return [run.result for run in runs]  # type: ignore[misc]  # none is pending: all have one

    def _watch(self, workers: tuple[WorkerProcess, ...]) -> None:
        """A new set for these workers: their sockets and exit watches."""
        self.close()
        epoll = select.epoll()
        positions: dict[int, int] = {}
        for position, worker in enumerate(workers):
            for fd in (worker.sock.fileno(), worker.exit_fd):
                if fd >= 0:
                    epoll.register(fd, _EPOLLIN)
                    positions[fd] = position
        self._epoll, self._workers, self._positions = epoll, workers, positions

    def _watch_output(self, runs: Sequence[StepRun]) -> None:
        """Past the quiet window: watch the pipes of the pending steps too, for this batch
        only (the next one starts on a new set)."""
        assert self._epoll is not None
        for position, run in enumerate(runs):
            if run.result is None:
                for fd in (run.worker.out_fd, run.worker.err_fd):
                    self._epoll.register(fd, _EPOLLIN)
                    self._positions[fd] = position
        self._workers = ()

    def _forget(self, fd: int) -> None:
        assert self._epoll is not None
        self._epoll.unregister(fd)
        del self._positions[fd]
        self._workers = ()

    def close(self) -> None:
        """Release the ``epoll`` set; the loop makes a new one if used again."""
        if self._epoll is not None:
            self._epoll.close()
        self._epoll, self._workers, self._positions = None, (), {}


def run_many(runs: Sequence[StepRun]) -> list[ExecResult]:
    """Drive every step to its result, once: :meth:`StepLoop.run` on a loop of its own."""
    loop = StepLoop()
    try:
        return loop.run(runs)
    finally:
        loop.close()
