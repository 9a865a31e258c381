"""Copies of the interpreter leave the worker's process tree, one fork each where they can."""

from __future__ import annotations

import os

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox import zygote
from tests.helpers import descendant_pids

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
            backend.restore(snapshot)
            assert snapshot.copy.pid is not None
            assert _parent(snapshot.copy.pid) == found.pid
            assert backend.worker_pid is not None
            assert _parent(backend.worker_pid) == found.pid
        with backend.fork() as fork:
            assert fork.worker_pid is not None
            assert _parent(fork.worker_pid) == found.pid


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
        backend.restore(snapshot)
        assert backend.run("print(x)").stdout == "41\n"
        assert snapshot.copy.pid is not None
        assert snapshot.copy.pid not in _our_children()


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
