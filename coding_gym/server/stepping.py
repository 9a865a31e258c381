"""Steps driven from the event loop: a quick step's reply is read there, without a thread.

Handing a step to a thread and back costs two wake-ups between threads, about as much as a
short step itself (a ``print(1)`` takes about 100 µs). So the loop sends the code and waits
for the worker with ``add_reader``. Only what cannot block is done there: reading a reply
that is whole and alone on the socket, and the output the worker says it left in its pipes.
Everything else goes to a thread, which drives the step to its end with
:meth:`StepRun.wait` as before: output to drain while the step runs (after the quiet window
of :data:`~coding_gym.sandbox.steps.QUIET_S`, as there), a worker that exited or sent
anything but one result (the clean-up may wait for an exit status), the deadline, long code.
The loop serves every session; a step must not hold it.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor

from coding_gym.backends.local import LocalBackend
from coding_gym.models import ExecResult
from coding_gym.sandbox.protocol import ResultFields
from coding_gym.sandbox.steps import QUIET_S, StepRun
from coding_gym.sandbox.supervisor import WorkerProcess

#: Longest code sent from the loop: it must fit the socket buffer (about 200 kB), or sending
#: would wait for the worker to read. 4 bytes per character at most in UTF-8.
LOOP_CODE_CHARS = 16 << 10
#: Output the loop may read for one reply (the worker's count of bytes left in its pipes,
#: which its code could forge); more than a pipe holds by default.
_LOOP_DRAIN_BYTES = 1 << 20


def ready_on_loop(backend: LocalBackend, code: str) -> bool:
    """True when a step of ``code`` can start from the loop without blocking it: a short
    plain step on an :func:`idle` worker."""
    return not backend.transactional and len(code) <= LOOP_CODE_CHARS and idle(backend)


def idle(backend: LocalBackend) -> bool:
    """The backend's worker is up and idle with nothing to say (``WorkerProcess.idle``):
    a step of it cannot wait, and it did not die while it waited."""
    # LocalBackend has no public accessor for its worker.
    worker = backend._episode.worker
    return worker is not None and worker.idle()


async def drive(backend: LocalBackend, code: str, timeout_s: float, executor: Executor,
                watch: WorkerWatch, asked_at: float | None = None) -> ExecResult:
    """Run ``code`` on ``backend`` (see :func:`ready_on_loop`): the reply is read on the
    loop if it comes whole and alone, before any output has to be drained; otherwise a
    thread of ``executor`` finishes the step.

    ``watch`` is the backend's, kept by the caller from one step to the next. The time limit
    counts from ``asked_at`` (see :meth:`LocalBackend.run`).
    """
    step = backend.begin(code, timeout_s=timeout_s, asked_at=asked_at)
    fields = None
    try:
        if step.result is None and await _replied(step, watch):
            # Whatever else came (what the step's code wrote to the socket, a partial
            # frame, the end of the stream) stays with the inbox, for the thread.
            fields = step.worker.inbox.receive_result()
            if fields is not None and drains_on_loop(fields):
                step.on_result(fields)
    except asyncio.CancelledError:
        backend.interrupt()  # nobody will read this step's reply: the next must not
        raise
    if step.result is None:
        watch.stop()  # the thread may close the worker's fds
        loop = asyncio.get_running_loop()
        if fields is not None:
            await loop.run_in_executor(executor, step.on_result, fields)
            result = step.result
        else:
            result = await loop.run_in_executor(executor, step.wait)
    else:
        result = step.result
        if not step.worker.alive:
            watch.stop()  # begin found the worker dead, and closed its fds
    assert result is not None
    return backend.finish(step, result)


def drains_on_loop(fields: ResultFields) -> bool:
    """Whether the output a reply says it left in the pipes may be read on the loop (the
    counts come from the worker, whose code could forge them)."""
    return fields[4] <= _LOOP_DRAIN_BYTES and fields[5] <= _LOOP_DRAIN_BYTES


class WorkerWatch:
    """The loop's readers on a worker's socket and exit fd, kept from one quick step to the
    next.

    Adding and removing two readers at every step cost 12 µs with uvloop (an epoll_ctl call
    and a handle each way, for each fd), measured warm. They stay
    while only the loop drives the worker, and must be removed (:meth:`stop`) before
    anything else may close its fds: a number closed while watched, then reused for another
    file, would leave the loop watching the wrong file.
    """

    def __init__(self) -> None:
        self.worker: WorkerProcess | None = None
        self._fds: tuple[int, ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._woken: asyncio.Future[bool] | None = None

    def wait(self, worker: WorkerProcess) -> asyncio.Future[bool]:
        """A future set to True when the worker's socket is readable, False when the worker
        exits (or the watch stops); starts watching ``worker`` if need be."""
        loop = asyncio.get_running_loop()
        if worker is not self.worker or loop is not self._loop:
            self.stop()
            sock_fd, exit_fd = worker.sock.fileno(), worker.exit_fd
            loop.add_reader(sock_fd, self._ready, True)
            self._fds = (sock_fd,)
            if exit_fd >= 0:
                loop.add_reader(exit_fd, self._ready, False)
                self._fds = (sock_fd, exit_fd)
            self.worker, self._loop = worker, loop
        self._woken = loop.create_future()
        return self._woken

    def wake(self, replied: bool) -> None:
        woken = self._woken
        if woken is not None and not woken.done():
            woken.set_result(replied)

    def end_wait(self) -> None:
        """The step woken by :meth:`wait` has read what woke it."""
        self._woken = None

    def _ready(self, replied: bool) -> None:
        worker = self.worker
        quiet, _ = worker.pollers() if worker is not None else (None, None)
        if quiet is None or not quiet.poll(0):
            # A late call: the loop saw the fd readable, then in the same turn a step read
            # what was there. Taken for the next step's reply, it would send that step to a
            # thread for nothing.
            return
        woken = self._woken
        if woken is None:
            # Between steps, the worker died or its code wrote to the socket: stop, or the
            # loop would call again at every turn; the next step finds out what happened.
            self.stop()
        elif not woken.done():
            woken.set_result(replied)

    def stop(self) -> None:
        """Remove the readers; a step waiting on the loop moves to a thread."""
        if self._loop is not None and not self._loop.is_closed():
            for fd in self._fds:
                self._loop.remove_reader(fd)
        self._fds, self.worker, self._loop = (), None, None
        self.wake(False)


async def _replied(step: StepRun, watch: WorkerWatch) -> bool:
    """Wait for the worker on the loop; True once its socket is readable, False when the
    step needs more than the loop does (its output to drain, its death, its deadline)."""
    loop = asyncio.get_running_loop()
    worker = step.worker
    woken = watch.wait(worker)
    watched: list[int] = []
    timer: asyncio.TimerHandle

    def after_quiet_window() -> None:
        # As StepRun.wait does: a quick step's output is read once, after its reply. A
        # step that outlasts the window is watched for output and for its deadline (one
        # timer per quick step, not two).
        nonlocal timer
        for fd in (worker.out_fd, worker.err_fd):
            if fd >= 0:
                loop.add_reader(fd, watch.wake, False)
                watched.append(fd)
        timer = loop.call_later(step.deadline - time.monotonic(), watch.wake, False)

    timer = loop.call_later(min(QUIET_S, step.deadline - time.monotonic()), after_quiet_window)
    try:
        return await woken
    finally:
        # No await from here until the step reads its reply: no turn of the loop between.
        watch.end_wait()
        timer.cancel()
        for fd in watched:
            loop.remove_reader(fd)
