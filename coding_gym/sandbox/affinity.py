"""Where a worker waits between steps: on the CPU of the thread that steps it.

A step wakes two processes: the worker, with the request, and the caller, with the reply.
Where an idle CPU halts (in a virtual machine above all), waking a process on another CPU
costs an interrupt to that CPU and its way back out of the halt. On a 2-vCPU VM a
``LocalBackend`` step of ``print(1)`` took 150-175 µs when each wake-up crossed to the other
CPU, and 77-92 µs with the whole process pinned to one (a TCP echo: 92 against 18 µs). Left
alone, the kernel crosses: it puts a woken process on an idle CPU rather than on the busy one
it was woken from.

So a worker stepped by one thread (:meth:`LocalBackend.run`, behind ``CodingEnv.step``)
*follows* it: :func:`pin` allows it only the CPU that thread runs on, and makes it an
idle-priority process (``SCHED_IDLE``). The request then wakes the worker where the caller
runs. The reply wakes the caller, and the kernel counts a CPU that runs only idle-priority
tasks as idle: it puts the caller back on the worker's CPU, where the caller preempts the
worker at once. Pinned but not idle-priority, the worker sent the caller to the other CPU at
almost every step (1874-2788 times in 3000), and the steps were no faster.

The pin is lifted (:func:`release`) when a step outlasts its quiet window (4 ms): code that
computes, maybe with threads or processes of its own, may use every CPU. Those threads and
processes were started on the pinned CPU, as idle-priority tasks, and are released with it.
A worker driven with others (the vector env's fan-out, the server's event loop and threads)
is never pinned: its steps must spread over the CPUs. Nor is one stepped while another
thread of the process is inside ``LocalBackend.run``: four threads each stepping a
``CodingEnv``, their workers pinned, made 12.4k-14.8k steps/s against 14.0k-17.3k free.
Nor is one while it forks copies of itself (a snapshot, a fork, a transactional step):
pinned and idle-priority, a fork took 4.2-4.7 ms against 3.4 ms.

Following is an optimisation, nothing depends on it: where a call is refused (another user's
worker without ``CAP_SYS_NICE``, a CPU outside the worker's cpuset, a C library without
``sched_getcpu``), the worker just stays where the kernel puts it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Iterable

from coding_gym.sandbox.libc import libc

#: A worker's CPU when it runs wherever the kernel puts it, and when it may have been pinned:
#: a copy, which inherits the pin of the worker it copies.
FREE, UNKNOWN = -1, -2
_SCHED_IDLE, _SCHED_BATCH = os.SCHED_IDLE, os.SCHED_BATCH
_PARAM = os.sched_param(0)


def _cpu_reader() -> Callable[[], int]:
    """``sched_getcpu()`` (a vDSO call: no system call), or a function that says -1."""
    try:
        function = libc().sched_getcpu
    except (OSError, AttributeError):
        return lambda: -1
    function.restype = ctypes.c_int
    function.argtypes = []
    return function


#: The CPU the calling thread runs on; -1 where it cannot be known.
current_cpu = _cpu_reader()


def process_cpus() -> set[int]:
    """The CPUs of this process's main thread: those a worker starts with (see
    :func:`reset_inherited`) and gets back from :func:`release`."""
    return os.sched_getaffinity(os.getpid())


def reset_inherited(pid: int) -> None:
    """Give ``pid``, a child just started (a zygote, a spawned worker), the CPUs of this
    process's main thread and, if it is a batch process, the normal policy. It inherited
    both from the thread that started it. That thread may have pinned itself: a zygote
    started from it passed the pin on to every worker. Or it may be a batch thread (the
    server's event loop, see ``server/serving.py``): a child that starts up as a batch
    process yields its CPU to whatever else was just forked, and its woken workers would
    wait for the scheduler's tick behind any busy process (a zygote's spares inherit its
    policy)."""
    try:
        os.sched_setaffinity(pid, process_cpus())
        if os.sched_getscheduler(pid) == _SCHED_BATCH:
            os.sched_setscheduler(pid, os.SCHED_OTHER, _PARAM)
    except OSError:
        pass


def pin(pid: int, cpu: int, *, first: bool) -> bool:
    """Allow process ``pid`` only ``cpu`` and, the ``first`` time, make it idle-priority;
    False if either was refused."""
    try:
        os.sched_setaffinity(pid, (cpu,))
        if first:
            os.sched_setscheduler(pid, _SCHED_IDLE, _PARAM)
    except OSError:
        return False
    return True


def release(pids: Iterable[int]) -> None:
    """Every thread of the processes ``pids``: the :func:`process_cpus` again, and the normal
    policy workers run under for those that are idle-priority (a thread that chose another
    policy keeps it). Threads that are gone, or refuse, are skipped."""
    cpus = process_cpus()
    for pid in pids:
        try:
            threads = [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
        except (OSError, ValueError):
            continue
        for tid in threads:
            try:
                os.sched_setaffinity(tid, cpus)
                if os.sched_getscheduler(tid) == _SCHED_IDLE:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, _PARAM)
            except OSError:
                continue
