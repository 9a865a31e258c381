"""LocalBackend(start_ahead=True): the next episode's interpreter is started in the background,
and a reset trades it in."""

from __future__ import annotations

import gc
import os

import pytest

from coding_gym.backends import ahead as ahead_module
from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox.processes import pid_alive
from tests.helpers import descendant_pids, settle
from tests.servers import wait_for


def ahead_pid(backend: LocalBackend) -> int:
    """The pid of the interpreter started ahead, once it is up."""
    assert backend._next is not None
    settle(backend)
    pid = backend._next.backend.worker_pid
    assert pid is not None
    return pid


def gone(pid: int) -> bool:
    return not pid_alive(pid)


@pytest.fixture
def backend():
    b = LocalBackend(Limits(timeout_s=2.0, memory_mb=512))
    b.reset()
    yield b
    b.close()


def test_reset_takes_the_interpreter_started_ahead_and_starts_the_next(backend):
    first = backend.worker_pid
    started_ahead = ahead_pid(backend)
    assert started_ahead != first
    backend.run("x = 1")
    backend.reset()
    assert backend.worker_pid == started_ahead
    following = ahead_pid(backend)
    assert following not in (first, started_ahead)
    wait_for(lambda: gone(first))


def test_the_traded_interpreter_is_fresh_in_a_new_directory(backend):
    backend.run("x = 1\nopen('mine.txt', 'w').write('hi')")
    old_dir, old_pid = backend.workdir, backend.worker_pid
    ahead_pid(backend)
    backend.reset()
    assert backend.workdir != old_dir
    result = backend.run("import os\nprint(os.listdir('.'))\nprint(x)")
    assert result.stdout == "[]\n"
    assert "NameError: name 'x' is not defined" in result.stderr
    # The old interpreter and its directory go in the background.
    wait_for(lambda: gone(old_pid) and not os.path.exists(old_dir))


def _state(pid: int) -> str:
    """The process's state letter (R, S, T...), or "" once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def test_nothing_of_the_old_episode_runs_after_the_reset(backend, monkeypatch):
    result = backend.run(
        "import subprocess, sys\n"
        "child = subprocess.Popen([sys.executable, '-c', 'while True: pass'],"
        " start_new_session=True)\n"
        "print(child.pid)")
    spinner, old = int(result.stdout), backend.worker_pid
    ahead_pid(backend)
    # The kill comes with the next start: far off, so that only the reset's stop can
    # account for the state seen here.
    monkeypatch.setattr(ahead_module, "START_DELAY_S", 30.0)
    backend.reset()
    # Stopped (a signal to a process running on another CPU takes effect in microseconds).
    wait_for(lambda: _state(spinner) == "T" and _state(old) == "T", 2.0)
    settle(backend)  # the start, and with it the kill, now
    wait_for(lambda: gone(spinner) and gone(old))


def test_a_reset_before_the_start_is_done_waits_for_it(backend):
    dirs, pids = set(), set()
    for _ in range(6):  # back to back: each reset finds the next start under way
        result = backend.run("import os\nprint(os.getcwd(), os.listdir('.'))\n"
                             "open('left.txt', 'w').write('x')")
        cwd, listing = result.stdout.split(" ", 1)
        assert listing == "[]\n"
        dirs.add(cwd)
        pids.add(backend.worker_pid)
        backend.reset()
    assert len(dirs) == 6 and len(pids) == 6


def test_the_live_and_the_waiting_interpreter_share_nothing(backend):
    """Each has its own directory, uid and cgroup, so the agent's code cannot touch the
    next episode's interpreter."""
    waiting = ahead_pid(backend)
    hidden = backend._next.backend
    assert hidden.workdir != backend.workdir
    live_uid = backend._episode.home.uid
    assert live_uid is None or hidden._episode.home.uid != live_uid
    live_cgroup, waiting_cgroup = backend._episode.cgroup, hidden._episode.cgroup
    if live_cgroup is not None:
        assert waiting_cgroup is not None and waiting_cgroup._memory != live_cgroup._memory
    result = backend.run(f"import os, signal\nos.kill({waiting}, signal.SIGKILL)")
    assert "PermissionError" in result.stderr or "ProcessLookupError" in result.stderr
    assert not gone(waiting)


def test_an_interpreter_that_died_while_it_waited_is_not_taken(backend):
    waiting = ahead_pid(backend)
    os.kill(waiting, 9)
    wait_for(lambda: gone(waiting))
    backend.reset()
    assert backend.worker_pid != waiting
    assert backend.run("print(6 * 7)").stdout == "42\n"


def test_a_failing_start_ahead_is_quiet_and_the_reset_starts_its_own(backend, monkeypatch):
    ahead_pid(backend)
    backend.reset()  # takes the one ready; the next start fails
    hidden = backend._next.backend
    monkeypatch.setattr(hidden, "reset", lambda: (_ for _ in ()).throw(OSError("no fork today")))
    backend.reset()
    assert backend.run("print('started by the reset')").stdout == "started by the reset\n"


def test_start_ahead_false_keeps_one_interpreter():
    before = descendant_pids()
    with LocalBackend(start_ahead=False) as plain:
        plain.reset()
        assert plain._next is None and not plain.start_ahead
        assert plain.describe()["start_ahead"] is False
        assert len(descendant_pids() - before) == 1
    with LocalBackend() as eager:
        eager.reset()
        ahead_pid(eager)
        assert eager.start_ahead and eager.describe()["start_ahead"] is True
        assert len(descendant_pids() - before) == 2


@pytest.mark.parametrize("wait", [True, False])
def test_close_kills_both_interpreters_and_removes_both_directories(wait):
    before = descendant_pids()
    backend = LocalBackend()
    backend.reset()
    dirs = [backend.workdir]
    if wait:
        ahead_pid(backend)
        dirs.append(backend._next.backend.workdir)
    backend.close()  # without waiting: while the start is under way
    assert descendant_pids() - before == set()
    for path in dirs:
        assert not os.path.exists(path)
    backend.close()  # twice is fine


def test_a_backend_collected_without_close_leaves_no_process():
    before = descendant_pids()
    backend = LocalBackend()
    backend.reset()
    ahead_pid(backend)
    del backend
    gc.collect()
    assert descendant_pids() - before == set()


def test_fork_and_snapshots_work_across_traded_interpreters(backend):
    backend.run("x = 5")
    snapshot = backend.snapshot()
    ahead_pid(backend)
    backend.reset()
    backend.restore(snapshot)
    assert backend.run("print(x)").stdout == "5\n"
    clone = backend.fork()
    try:
        assert clone.start_ahead
        clone.reset()
        assert "NameError" in clone.run("print(x)").stderr
        assert backend.run("print(x)").stdout == "5\n"
    finally:
        clone.close()
        snapshot.release()


def test_a_forked_child_of_the_owner_does_not_wait_for_a_start_it_does_not_have():
    backend = LocalBackend()
    try:
        backend.reset()
        backend.reset()  # and the next start is under way as we fork
        pid = os.fork()
        if pid == 0:  # the child drops its copy of the backend, as a garbage collection would
            try:
                backend.close()
            finally:
                os._exit(0)
        try:
            wait_for(lambda: os.waitpid(pid, os.WNOHANG)[0] == pid, 10.0)
        finally:
            try:
                os.kill(pid, 9)  # a child that hung (it would wait forever)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        assert backend.run("print('still mine')").stdout == "still mine\n"
    finally:
        backend.close()
