"""Snapshots, restores, forks and transactional steps, on the backend and on the env."""

from __future__ import annotations

import os
import signal

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.env import CodingEnv
from coding_gym.errors import SnapshotError
from coding_gym.models import ExecResult, Limits
from tests.helpers import descendant_pids

STATE = (
    "import random, collections\n"
    "random.seed(7)\n"
    "counts = collections.Counter('mississippi')\n"
    "def area(r):\n    return 3 * r * r\n"
    "class Box:\n    def __init__(self, v):\n        self.v = v\n"
    "box = Box([1, 2, {'k': (3, 4)}])\n"
)
SHOW = "print(counts.most_common(2), area(2), box.v, random.random())"


@pytest.fixture(params=["zygote", "spawn"])
def backend(request):
    b = LocalBackend(Limits(timeout_s=2.0), start_method=request.param)
    b.reset()
    b.run(STATE)
    yield b
    b.close()


def test_restore_brings_back_variables_imports_and_random_state(backend):
    expected = backend.run(SHOW).stdout
    backend.run("random.seed(7)")
    snapshot = backend.snapshot()
    assert backend.run(SHOW).stdout == expected
    backend.run("del counts\nbox.v.append('changed')\nimport json")
    backend.restore(snapshot)
    assert backend.run(SHOW).stdout == expected
    assert "json" not in backend.run("print(dir())").stdout


def test_a_snapshot_can_be_restored_many_times(backend):
    backend.run("n = 0")
    with backend.snapshot() as snapshot:
        for _ in range(3):
            backend.restore(snapshot)
            assert backend.run("n += 1\nprint(n)").stdout == "1\n"


def test_restore_after_reset_and_after_a_crash(backend):
    backend.run("kept = 'yes'")
    snapshot = backend.snapshot()
    backend.reset()
    assert "NameError" in backend.run("print(kept)").stderr
    backend.restore(snapshot)
    assert backend.run("print(kept)").stdout == "yes\n"
    assert backend.run("import os; os._exit(1)").state_lost
    backend.restore(snapshot)
    assert backend.run("print(kept)").stdout == "yes\n"
    snapshot.release()


@pytest.mark.parametrize("ending", ["interrupt", "reset", "process group killed"])
def test_a_snapshot_outlives_the_worker_it_was_just_restored_into(backend, ending):
    # The restored worker forks the snapshot's next frozen process once it is ready; ending
    # that worker at once, cgroup and process group included, must leave the snapshot whole.
    backend.run("kept = 'yes'")
    with backend.snapshot() as snapshot:
        for _ in range(3):
            backend.restore(snapshot)
            if ending == "interrupt":
                backend.interrupt()
            elif ending == "reset":
                backend.reset()
            else:
                assert backend.run("import os, signal\nos.killpg(0, signal.SIGKILL)").state_lost
        backend.restore(snapshot)
        assert backend.run("print(kept)").stdout == "yes\n"


def test_forks_are_independent_and_diverge(backend):
    backend.run("items = [0]")
    forks = [backend.fork() for _ in range(2)]
    try:
        for i, fork in enumerate(forks, start=1):
            fork.run(f"items.append({i})")
        backend.run("items.append(-1)")
        outputs = [b.run("print(items)").stdout for b in (backend, *forks)]
        assert outputs == ["[0, -1]\n", "[0, 1]\n", "[0, 2]\n"]
        pids = {backend.worker_pid, *(fork.worker_pid for fork in forks)}
        assert len(pids) == 3
    finally:
        for fork in forks:
            fork.close()
    assert backend.run("print(items)").stdout == "[0, -1]\n"


def test_a_fork_shares_the_working_directory(backend):
    backend.run("open('note.txt', 'w').write('hi')")
    with backend.fork() as fork:
        assert fork.workdir == backend.workdir
        assert fork.run("print(open('note.txt').read())").stdout == "hi\n"
    assert os.path.isdir(backend.workdir)


def test_a_fork_outlives_its_origin():
    origin = LocalBackend(Limits(timeout_s=2.0))
    origin.reset()
    origin.run("x = 5")
    fork = origin.fork()
    workdir = origin.workdir
    origin.close()
    assert fork.run("print(x)").stdout == "5\n"
    assert os.path.isdir(workdir)
    fork.close()
    assert not os.path.exists(workdir)


def test_released_snapshot_cannot_be_restored(backend):
    snapshot = backend.snapshot()
    snapshot.release()
    snapshot.release()
    with pytest.raises(SnapshotError, match="released"):
        backend.restore(snapshot)


def test_restore_wants_a_snapshot(backend):
    with pytest.raises(TypeError, match="Expected a Snapshot"):
        backend.restore("not a snapshot")  # type: ignore[arg-type]


def test_snapshots_leave_no_process_behind(no_leaked_processes):
    backend = LocalBackend()
    backend.reset()
    kept = [backend.snapshot() for _ in range(3)]
    fork = backend.fork()
    backend.restore(kept[0])
    kept[1].release()
    fork.close()
    backend.close()
    assert all(snapshot.released for snapshot in kept)


@pytest.fixture(params=["zygote", "spawn"])
def transactional(request):
    b = LocalBackend(Limits(timeout_s=1.0), start_method=request.param, transactional=True)
    b.reset()
    b.run("total = 10\nimport os")
    yield b
    b.close()


@pytest.mark.parametrize(("code", "kill_reason", "exit_code"), [
    ("total += 1\nsum(range(10**12))", "timeout", 128 + signal.SIGKILL),
    ("total += 1\nimport time\ntime.sleep(30)", "timeout", 1),
    ("total += 1\nos._exit(3)", "crash", 3),
    ("total += 1\nos.kill(os.getpid(), signal.SIGKILL)", "signal", 128 + signal.SIGKILL),
    ("total += 1\nimport ctypes\nctypes.string_at(0)", "signal", 128 + signal.SIGSEGV),
])
def test_transactional_step_rolls_back(transactional, code, kill_reason, exit_code):
    transactional.run("import signal")
    result = transactional.run(code)
    assert (result.kill_reason, result.exit_code) == (kill_reason, exit_code)
    assert result.state_lost is False
    assert result.extra["rolled_back"] is True
    assert "rolled back" in result.stderr or "restored to its state before" in result.stderr
    assert transactional.run("print(total)").stdout == "10\n"


def test_transactional_step_that_succeeds_or_raises_is_kept(transactional):
    ok = transactional.run("total += 1")
    assert ok.extra == {"rolled_back": False}
    failed = transactional.run("total += 1\n1/0")
    assert failed.exit_code == 1 and failed.extra["rolled_back"] is False
    assert transactional.run("print(total)").stdout == "12\n"


def test_transactional_steps_leave_no_process_behind(no_leaked_processes):
    with LocalBackend(Limits(timeout_s=1.0), transactional=True) as backend:
        backend.reset()
        for i in range(5):
            backend.run(f"x = {i}")
        backend.run("import os; os._exit(1)")
        assert backend.run("print(x)").stdout == "4\n"
        pid = backend.worker_pid
        assert pid is not None and not descendant_pids(pid)


# -- The env ---------------------------------------------------------------------------------


def test_env_snapshot_restores_the_episode():
    with CodingEnv(timeout_s=2.0) as env:
        _, info = env.reset(seed=3)
        env.step("x = 1")
        snapshot = env.snapshot()
        env.step("x = 2")
        env.reset()
        env.restore(snapshot)
        obs, *_, after = env.step("print(x)")
        assert obs["stdout"] == "1\n"
        assert after["episode_id"] == info["episode_id"] and after["step"] == 2
        snapshot.release()


def test_env_snapshot_restores_np_random_and_fork_copies_it():
    with CodingEnv(timeout_s=2.0) as env:
        env.reset(seed=5)
        snapshot = env.snapshot()
        drawn = env.np_random.random(3)
        env.restore(snapshot)
        assert (env.np_random.random(3) == drawn).all()
        env.restore(snapshot)
        with env.fork() as fork:
            assert fork.np_random is not env.np_random
            assert (fork.np_random.random(3) == drawn).all()
            assert (env.np_random.random(3) == drawn).all()
        snapshot.release()


def test_env_fork_continues_the_same_episode_independently():
    with CodingEnv(timeout_s=2.0) as env:
        env.reset(seed=3)
        env.step("x = [1]")
        with env.fork() as fork:
            fork.step("x.append(2)")
            env.step("x.append(3)")
            assert fork.step("print(x)")[0]["stdout"] == "[1, 2]\n"
            assert env.step("print(x)")[0]["stdout"] == "[1, 3]\n"
            assert fork.episode_id == env.episode_id and fork.step_count == env.step_count


def test_env_fork_with_tasks_grades_on_its_own():
    with CodingEnv(tasks="builtin", timeout_s=5.0) as env:
        env.reset(seed=0)
        assert env.task is not None
        with env.fork() as fork:
            assert fork.task is env.task
            _, reward, terminated, *_ = fork.step(env.task.solution)
            assert (reward, terminated) == (1.0, True)
            _, reward, terminated, *_ = env.step("pass")
            assert terminated is False


def test_env_transactional_rollback_in_info():
    with CodingEnv(timeout_s=1.0, transactional=True) as env:
        env.reset()
        env.step("x = 1")
        obs, *_, info = env.step("x = 2\nsum(range(10**12))")
        assert info["rolled_back"] is True and info["state_lost"] is False
        assert info["kill_reason"] == "timeout" and obs["exit_code"] == 137
        assert env.step("print(x)")[0]["stdout"] == "1\n"


class _PlainBackend:
    """A backend without snapshots."""

    def reset(self) -> None:
        pass

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        return ExecResult()

    def describe(self) -> dict:
        return {"backend": "plain"}

    def close(self) -> None:
        pass


def test_snapshots_need_the_local_backend():
    with CodingEnv(backend=_PlainBackend()) as env:
        env.reset()
        with pytest.raises(SnapshotError, match=r"snapshot\(\) needs the local backend"):
            env.snapshot()
        with pytest.raises(SnapshotError, match=r"fork\(\) needs the local backend"):
            env.fork()
