"""A worker stepped by one thread waits on that thread's CPU (see sandbox/affinity.py)."""

from __future__ import annotations

import os
import threading
import time

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox import cgroups, steps, supervisor
from tests.helpers import in_thread, loop_step

CPUS = sorted(os.sched_getaffinity(0))
two_cpus = pytest.mark.skipif(len(CPUS) < 2, reason="following a thread to another CPU "
                                                    "takes two CPUs")


def _placement(pid: int) -> tuple[set[int], int]:
    return os.sched_getaffinity(pid), os.sched_getscheduler(pid)


def _pin(tid: int, cpu: int) -> None:
    os.sched_setaffinity(tid, (cpu,))
    os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))


def _threads(pid: int) -> list[int]:
    return sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task"))


@pytest.fixture(autouse=True)
def long_quiet_window(monkeypatch):
    """A quiet window of 1 s: no step here outlasts it by chance, on however busy a machine,
    and is released for that (but the one meant to)."""
    monkeypatch.setattr(steps, "QUIET_S", 1.0)


@pytest.fixture
def backend():
    started = LocalBackend(Limits(timeout_s=5.0))
    started.reset()
    yield started
    started.close()


@two_cpus
def test_the_worker_waits_on_the_cpu_of_the_thread_that_steps_it(backend):
    pid = backend.worker_pid
    for cpu in (CPUS[-1], CPUS[0]):
        assert in_thread(cpu=cpu, body=lambda: backend.run("x = 1\nprint(x)")).stdout == "1\n"
        assert _placement(pid) == ({cpu}, os.SCHED_IDLE)
    assert backend.worker_pid == pid  # the same interpreter throughout
    assert backend.run("print(x + 1)").stdout == "2\n"


def test_a_step_that_outlasts_the_quiet_window_frees_the_worker_and_its_threads(backend):
    pid = backend.worker_pid
    started = backend.run("import threading, time\n"
                          "stop = threading.Event()\n"
                          "helper = threading.Thread(target=stop.wait)\n"
                          "helper.start()")
    assert started.exit_code == 0
    helper = [tid for tid in _threads(pid) if tid != pid]
    assert len(helper) == 1
    in_thread(cpu=CPUS[0], body=lambda: backend.run("print(1)"))
    # As a thread started by a quick step of a pinned worker is: pinned and idle-priority.
    _pin(helper[0], CPUS[0])
    assert _placement(pid) == _placement(helper[0]) == ({CPUS[0]}, os.SCHED_IDLE)
    in_thread(cpu=CPUS[0], body=lambda: backend.run("time.sleep(1.2)"))
    for tid in (pid, helper[0]):
        assert _placement(tid) == (set(CPUS), os.SCHED_OTHER)
    backend.run("stop.set(); helper.join()")


def test_a_step_begun_for_a_loop_frees_a_worker_a_thread_had_pinned(backend):
    pid = backend.worker_pid
    in_thread(cpu=CPUS[0], body=lambda: backend.run("print(1)"))
    assert _placement(pid) == ({CPUS[0]}, os.SCHED_IDLE)
    assert loop_step(backend, "print(2)").stdout == "2\n"
    assert _placement(pid) == (set(CPUS), os.SCHED_OTHER)


def test_a_copy_that_may_have_been_pinned_is_freed_by_its_first_loop_step(backend):
    backend.run("x = 41")
    with backend.fork() as forked:
        pid = forked.worker_pid
        # A copy of a worker starts as the worker was when copied, pinned maybe: its first
        # step from a loop makes sure it is free.
        _pin(pid, CPUS[0])
        assert loop_step(forked, "print(x + 1)").stdout == "42\n"
        assert _placement(pid) == (set(CPUS), os.SCHED_OTHER)


def test_a_refused_pin_leaves_the_worker_free_and_is_not_tried_again(backend, monkeypatch):
    calls: list[tuple[int, object]] = []

    allow = os.sched_setaffinity

    def refuse(pid: int, cpus: object) -> None:
        if pid == 0:  # the test's thread, which moves to its CPU
            return allow(pid, cpus)
        calls.append((pid, cpus))
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    for _ in range(3):
        assert in_thread(cpu=CPUS[0], body=lambda: backend.run("print(1)")).stdout == "1\n"
    assert [cpus for _, cpus in calls if cpus == (CPUS[0],)] == [(CPUS[0],)]  # tried once
    monkeypatch.undo()
    assert _placement(backend.worker_pid) == (set(CPUS), os.SCHED_OTHER)


def test_a_thread_whose_cpu_is_unknown_leaves_the_worker_free(backend, monkeypatch):
    monkeypatch.setattr(supervisor, "_current_cpu", lambda: -1)
    assert backend.run("print(1)").stdout == "1\n"
    assert _placement(backend.worker_pid) == (set(CPUS), os.SCHED_OTHER)


def test_a_worker_that_died_is_not_touched(backend):
    in_thread(cpu=CPUS[0], body=lambda: backend.run("print(1)"))
    result = backend.run("import os\nos._exit(3)")
    assert result.exit_code == 3 and result.state_lost
    assert in_thread(cpu=CPUS[0], body=lambda: backend.run("print(2)")).stdout == "2\n"
    assert _placement(backend.worker_pid) == ({CPUS[0]}, os.SCHED_IDLE)  # the new worker


def test_a_snapshot_and_a_fork_free_the_worker_first(backend):
    # Their copies fork in the worker: on every CPU, not idle-priority, they are faster. (The
    # worker's policy is the default one while it forks, and batch again after its reply.)
    pid = backend.worker_pid
    in_thread(cpu=CPUS[0], body=lambda: backend.run("x = 1"))
    with backend.snapshot():
        cpus, policy = _placement(pid)
        assert cpus == set(CPUS) and policy != os.SCHED_IDLE
    in_thread(cpu=CPUS[0], body=lambda: backend.run("x = 2"))
    assert _placement(pid) == ({CPUS[0]}, os.SCHED_IDLE)
    with backend.fork() as forked:
        cpus, policy = _placement(pid)
        assert cpus == set(CPUS) and policy != os.SCHED_IDLE
        assert forked.run("print(x)").stdout == "2\n"


def test_a_transactional_step_leaves_the_worker_free():
    with LocalBackend(Limits(timeout_s=5.0), transactional=True) as transactional:
        transactional.reset()
        assert in_thread(cpu=CPUS[0], body=lambda: transactional.run("print(1)")).stdout == "1\n"
        assert _placement(transactional.worker_pid) == (set(CPUS), os.SCHED_OTHER)


@two_cpus
@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
def test_a_worker_started_from_a_pinned_thread_gets_the_process_cpus(start_method):
    # A preload of its own: a zygote started here, by the pinned thread.
    preload = ("json",) if start_method == "zygote" else ()

    def start() -> tuple[set[int], str]:
        with LocalBackend(Limits(timeout_s=5.0), start_method=start_method,
                          preload=preload) as started:
            started.reset()
            cpus = os.sched_getaffinity(started.worker_pid)
            step = started.begin("print(1)")
            return cpus, step.wait().stdout

    assert in_thread(cpu=CPUS[-1], body=start) == (set(CPUS), "1\n")


@pytest.mark.skipif(not cgroups.probe().version, reason="the processes a worker started are "
                    "found through its cgroup, and there are no cgroups here")
def test_a_long_step_frees_the_processes_the_worker_started(backend):
    pid = backend.worker_pid
    started = backend.run("import subprocess\nchild = subprocess.Popen(['sleep', '30'])")
    assert started.exit_code == 0
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        (child,) = (int(found) for found in f.read().split())
    in_thread(cpu=CPUS[0], body=lambda: backend.run("print(1)"))
    _pin(child, CPUS[0])  # as a process started by a quick step of a pinned worker is
    in_thread(cpu=CPUS[0], body=lambda: backend.run("import time\ntime.sleep(1.2)"))
    assert _placement(child) == (set(CPUS), os.SCHED_OTHER)
    backend.run("child.kill(); child.wait()")


def test_a_worker_stepped_while_another_thread_steps_stays_free(backend):
    # Threads that step workers at the same time: their workers must spread over the CPUs.
    with LocalBackend(Limits(timeout_s=5.0)) as other:
        other.reset()
        busy = threading.Thread(target=other.run, args=("import time\ntime.sleep(0.5)",))
        busy.start()
        try:
            time.sleep(0.1)  # the other thread is inside its step
            assert in_thread(cpu=CPUS[0], body=lambda: backend.run("print(1)")).stdout == "1\n"
            cpus, policy = _placement(backend.worker_pid)
            assert cpus == set(CPUS) and policy != os.SCHED_IDLE
        finally:
            busy.join()
        in_thread(cpu=CPUS[0], body=lambda: backend.run("print(2)"))  # alone again
        assert _placement(backend.worker_pid) == ({CPUS[0]}, os.SCHED_IDLE)
