"""Steps on many workers at once, driven by one ``epoll`` loop (see :class:`StepLoop`).

N workers run at once without a thread or process per worker: the steps are sent, then one
loop reads whichever worker answers first. As in :meth:`StepRun.wait
<coding_gym.sandbox.steps.StepRun.wait>`, only the replies and the workers' deaths wake the
loop for the first :data:`~coding_gym.sandbox.steps.QUIET_S` of a batch; the output pipes are
watched after that.

While the loop waits, its thread is a batch thread (``SCHED_BATCH``, see :class:`Yielding`): a
reply wakes it without preempting the worker that sent it.
"""

from __future__ import annotations

import os
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


class Yielding:
    """Makes the calling thread a batch thread (``SCHED_BATCH``) for a while, then a normal
    one again; a thread under any other policy is left as it is.

    A normal thread woken by a worker's reply preempts that worker, whose CPU weight is far
    lower than its own (see :mod:`coding_gym.sandbox.cgroups`), in the middle of its
    ``send``. With N workers on few CPUs that is a preemption and an interrupt to another
    CPU for each reply, which cost more than the loop's Python: 8 envs stepping ``print(1)``
    on a 2-CPU VM, the parent spent 62 µs of CPU per env-step and each worker 70 µs; as a
    batch thread 43 and 58 µs, and the loop blocked 2.5 times a batch instead of 6. A batch
    thread, once woken, waits for the running worker to block (it is about to: it has
    replied) or for the scheduler's tick. Its nice value does not change.

    Only the calling thread changes (Linux's policies are per thread), two system calls a
    batch (three with the check), and never when the policy is not ``SCHED_OTHER`` (a
    real-time thread, an idle one, or one whose owner chose batch already). Where the
    system calls are refused (seccomp in some containers) the thread stays normal.
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active = False

    def __enter__(self) -> Yielding:
        self.active = become_batch()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            self.active = False
            try:
                _set_policy(0, _SCHED_OTHER, _PARAM)
            except OSError:
                pass


def become_batch() -> bool:
    """Make the calling thread a batch thread if it is a normal one (``SCHED_OTHER``);
    whether it did. Its nice value is kept; a refused system call leaves it as it was."""
    try:
        if _get_policy(0) != _SCHED_OTHER:
            return False
        _set_policy(0, _SCHED_BATCH, _PARAM)
    except OSError:
        return False
    return True


_get_policy, _set_policy = os.sched_getscheduler, os.sched_setscheduler
_SCHED_OTHER, _SCHED_BATCH, _PARAM = os.SCHED_OTHER, os.SCHED_BATCH, os.sched_param(0)


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
        with Yielding():
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
