"""Copies of the interpreter leave the worker's process tree, one fork each where they can."""

from __future__ import annotations

import os
import time

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox import zygote
from tests.helpers import descendant_pids, loop_step, settle

START_A_THREAD = (
    "import threading\n"
    "stop = threading.Event()\n"
    "worker_thread = threading.Thread(target=stop.wait)\n"
    "worker_thread.start()\n"
)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[1])


def _our_children() -> set[int]:
    with open(f"/proc/self/task/{os.getpid()}/children") as f:
        return {int(pid) for pid in f.read().split()}


@pytest.fixture(params=["zygote", "spawn"])
def backend(request):
    b = LocalBackend(Limits(timeout_s=5.0), start_method=request.param)
    b.reset()
    b.run("x = 41")
    yield b
    b.close()


def test_copies_and_restored_workers_are_children_of_the_zygote():
    with LocalBackend(Limits(timeout_s=5.0)) as backend:
        backend.reset()
        found = zygote.get()
        assert found is not None
        with backend.snapshot() as snapshot:
            for _ in range(2):  # the copy itself, then its successor
                backend.restore(snapshot)
                assert backend.worker_pid is not None
                assert _parent(backend.worker_pid) == found.pid
        with backend.fork() as fork:
            assert fork.worker_pid is not None
            assert _parent(fork.worker_pid) == found.pid


WRITE_EVERYWHERE = (
    "import os\n"
    "for fd in range(3, 1024):\n"
    "    try:\n"
    "        os.write(fd, b'LEAK')\n"
    "    except OSError:\n"
    "        pass\n"
)


def test_a_fork_cannot_write_into_the_output_of_the_env_it_was_forked_from(backend):
    with backend.fork() as fork:
        fork.run(WRITE_EVERYWHERE)  # may break the fork's own worker: its own business
    after = backend.run("print(x)")
    assert (after.stdout, after.stderr) == ("41\n", "")


@pytest.mark.parametrize("threads", [False, True], ids=["one thread", "threads"])
def test_a_copy_is_not_below_the_worker_nor_a_child_of_ours(backend, threads):
    # Spawned workers, and workers running threads, take the double fork instead.
    if threads:
        backend.run(START_A_THREAD)
    worker = backend.worker_pid
    assert worker is not None
    ours = _our_children()
    with backend.snapshot() as snapshot:
        assert backend.run("x += 1\nprint(x)").stdout == "42\n"
        assert not descendant_pids(worker) - {worker}
        assert _our_children() <= ours
        for _ in range(2):
            backend.restore(snapshot)
            assert backend.run("x += 1\nprint(x)").stdout == "42\n"
            assert backend.worker_pid not in _our_children()


@pytest.mark.parametrize("threads", [False, True], ids=["one thread", "threads"])
def test_a_transactional_step_runs_without_its_copy_below_it(threads):
    with LocalBackend(Limits(timeout_s=1.0), transactional=True) as backend:
        backend.reset()
        backend.run("import os\nx = 1" + ("\n" + START_A_THREAD if threads else ""))
        children = "print(open(f'/proc/self/task/{os.getpid()}/children').read().split())"
        assert backend.run(f"x += 1\n{children}").stdout == "[]\n"
        rolled_back = backend.run("x += 1\nos._exit(3)")
        assert rolled_back.extra["rolled_back"] is True
        assert backend.run("print(x)").stdout == "2\n"


def test_a_snapshot_outlives_workers_restored_from_it_and_killed_at_once(backend):
    with backend.snapshot() as snapshot:
        for _ in range(10):
            backend.restore(snapshot)  # kills the last one, maybe before its successor ran
        # A restored worker that kills its own process group leaves the snapshot alone.
        assert backend.run("import os, signal\nos.killpg(0, signal.SIGKILL)").state_lost
        backend.restore(snapshot)
        assert backend.run("print(x)").stdout == "41\n"


def test_restoring_many_times_leaves_one_frozen_process(no_leaked_processes):
    with LocalBackend(Limits(timeout_s=5.0)) as backend:
        backend.reset()
        settle(backend)
        before = descendant_pids()
        with backend.snapshot() as snapshot:
            for _ in range(5):
                backend.restore(snapshot)
            backend.run("pass")
            # The worker and one frozen process: the earlier frozen processes became the
            # workers that were replaced, and killed (give them a moment to exit).
            deadline = time.monotonic() + 5
            while len(descendant_pids() - before) > 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(descendant_pids() - before) == 2


def test_snapshotting_restored_and_rolled_back_workers_keep_the_worker_scheduling_policy(
        backend):
    policy = "import os\nprint(os.sched_getscheduler(0))"
    # Steps begun as a loop begins them: a worker that follows the thread that steps it
    # changes its policy for that (see test_affinity.py).
    expected = loop_step(backend, policy).stdout
    with backend.snapshot() as snapshot:
        # The worker's policy changes while it forks the copy, and is back once it replied.
        assert loop_step(backend, policy).stdout == expected
        backend.restore(snapshot)
        assert loop_step(backend, policy).stdout == expected
    with LocalBackend(Limits(timeout_s=1.0), transactional=True) as transactional:
        transactional.reset()
        expected = loop_step(transactional, policy).stdout
        assert loop_step(transactional, "import os\nos._exit(3)").extra["rolled_back"] is True
        assert loop_step(transactional, policy).stdout == expected


def test_a_copy_of_a_spawned_worker_is_out_of_its_tree_when_the_snapshot_returns():
    # Without a cgroup to park it in, the copy survives the worker's kill only by being
    # elsewhere in the process tree by then.
    for _ in range(10):
        with LocalBackend(Limits(timeout_s=5.0), isolation={"cgroup": False},
                          start_method="spawn") as backend:
            backend.reset()
            backend.run("x = 1")
            with backend.snapshot() as snapshot:
                backend.restore(snapshot)
                assert backend.run("print(x)").stdout == "1\n"
