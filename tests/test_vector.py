"""CodingVectorEnv: same results as N single envs, Gymnasium's batching and autoreset modes."""

from __future__ import annotations

import os
import threading
import time

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.env import CodingEnv
from coding_gym.errors import BackendError, InvalidAction
from coding_gym.models import ExecResult
from coding_gym.sandbox import steps
from coding_gym.vector import CodingVectorEnv
from tests.helpers import in_thread

ACTIONS = [
    ("x = 1", "print('é\\x00')", "import sys; sys.exit(7)", "y = [1]"),
    ("print(x)", "1/0", "print(open('f', 'w').write('abc'))", "y.append(2); print(y)"),
    ("import time; time.sleep(5)", "print('a' * 3000)", "import os; os._exit(4)", "print(y)"),
]
# Differ from run to run, whatever the seed.
_TIMINGS = {"wall_time_s", "cpu_time_s"}


def _comparable(info: dict) -> dict:
    return {key: value for key, value in info.items()
            if key.lstrip("_") not in _TIMINGS and key not in ("final_info",)}


def _assert_same(ours, theirs) -> None:
    (obs, rewards, terminated, truncated, info), (obs2, rewards2, terminated2, truncated2,
                                                  info2) = ours, theirs
    assert obs.keys() == obs2.keys()
    for key in obs:
        if isinstance(obs[key], np.ndarray):
            np.testing.assert_array_equal(obs[key], obs2[key])
        else:
            assert obs[key] == obs2[key], key
    np.testing.assert_array_equal(rewards, rewards2)
    np.testing.assert_array_equal(terminated, terminated2)
    np.testing.assert_array_equal(truncated, truncated2)
    assert list(info) == list(info2)  # the same keys, in the same order
    for key in _TIMINGS & info.keys():
        assert info[key].dtype == info2[key].dtype, key
        np.testing.assert_array_equal(info["_" + key], info2["_" + key])
    ours_info, theirs_info = _comparable(info), _comparable(info2)
    for key in ours_info:
        np.testing.assert_equal(ours_info[key], theirs_info[key], err_msg=key)


def _pair(num_envs: int, mode: AutoresetMode, **kwargs):
    ours = CodingVectorEnv(num_envs, autoreset_mode=mode, **kwargs)
    steps = kwargs.pop("max_episode_steps", None)

    def make() -> gym.Env:
        env: gym.Env = CodingEnv(**kwargs)
        if steps is not None:
            env = gym.wrappers.TimeLimit(env, steps)
        return env

    theirs = SyncVectorEnv([make] * num_envs, autoreset_mode=mode)
    return ours, theirs


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP])
def test_results_equal_single_envs_with_the_same_seeds_and_actions(mode):
    ours, theirs = _pair(4, mode, timeout_s=1.0, max_episode_steps=2)
    try:
        first, second = ours.reset(seed=11), theirs.reset(seed=11)
        np.testing.assert_equal(first, second)
        for actions in ACTIONS * 2:
            _assert_same(ours.step(actions), theirs.step(actions))
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("kwargs", [
    {},  # long episodes: the plain steps the vector env finishes column by column
    {"reward_transforms": "openenv"},
    {"transactional": True},  # "rolled_back" in every info
])
def test_long_episodes_equal_single_envs(kwargs):
    ours, theirs = _pair(3, AutoresetMode.SAME_STEP, timeout_s=1.0, **kwargs)
    try:
        np.testing.assert_equal(ours.reset(seed=5), theirs.reset(seed=5))
        for actions in [("x = 1", "import os", "print('a')"),
                        ("print(x)", "1/0", "import time; time.sleep(3)"),
                        ("print(x + 1)", "print(open('f', 'w'))", "print('b' * 70000)")]:
            _assert_same(ours.step(actions), theirs.step(actions))
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.NEXT_STEP])
def test_task_episodes_equal_single_envs_and_their_gradings_run_at_once(monkeypatch, mode):
    from coding_gym.tasks.grading import Grader

    # Armed for our first step, whose three gradings must all be under way at once to pass
    # it: one after the other, the first would wait for the others until the timeout.
    together: list[threading.Barrier] = []
    grade = Grader.grade

    def meeting(self, task, program):
        if together:
            together[0].wait()
        return grade(self, task, program)

    monkeypatch.setattr(Grader, "grade", meeting)
    ours, theirs = _pair(3, mode, tasks="builtin", timeout_s=5.0)
    try:
        np.testing.assert_equal(ours.reset(seed=3), theirs.reset(seed=3))
        for round_ in range(3):
            tasks = ours.get_attr("task")
            assert tasks == theirs.get_attr("task")
            # Solved, not solved, and solved on a later round (its task stays).
            actions = (tasks[0].solution, f"def nothing_{round_}(): pass",
                       tasks[2].solution if round_ else "1/0")
            if round_ == 0:
                together.append(threading.Barrier(3, timeout=10.0))
            step = ours.step(actions)
            together.clear()
            _assert_same(step, theirs.step(actions))
    finally:
        ours.close()
        theirs.close()


def test_make_vec_returns_the_native_vector_env():
    envs = gym.make_vec("CodingEnv-v0", num_envs=3, timeout_s=2.0)
    try:
        assert isinstance(envs.unwrapped, CodingVectorEnv)
        assert envs.metadata["autoreset_mode"] is AutoresetMode.SAME_STEP
        assert envs.num_envs == 3
        obs, _ = envs.reset(seed=0)
        assert envs.observation_space.contains(obs)
        obs, *_ = envs.step(["print(1)", "print(2)", "print(3)"])
        assert obs["stdout"] == ("1\n", "2\n", "3\n")
        assert obs["exit_code"].dtype == np.int64
        assert envs.observation_space.contains(obs)
    finally:
        envs.close()


@pytest.mark.parametrize("tasks", [None, "builtin"])
def test_a_batch_kept_from_an_earlier_step_does_not_change_with_the_next(tasks):
    # As SyncVectorEnv's (copy=True, its default): a rollout buffer keeps each step's batch.
    with CodingVectorEnv(2, timeout_s=2.0, tasks=tasks) as envs:
        first, _ = envs.reset(seed=0)
        first_codes = first["exit_code"].copy()
        second, *_ = envs.step(("import sys; sys.exit(3)", "print(1)"))
        third, *_ = envs.step(("print(1)", "import sys; sys.exit(4)"))
        assert first["exit_code"].tolist() == first_codes.tolist()
        assert second["exit_code"].tolist() == [3, 0]
        assert third["exit_code"].tolist() == [0, 4]


def test_same_step_autoreset_returns_the_new_episode_and_the_final_one_in_info():
    with CodingVectorEnv(2, max_episode_steps=2) as envs:
        _, info = envs.reset(seed=5)
        first_ids = list(info["episode_id"])
        envs.step(("a = 1", "a = 2"))
        obs, _, _, truncated, info = envs.step(("print(a)", "print(a)"))
        assert truncated.all()
        assert obs["stdout"] == ("", "")
        assert [final["stdout"] for final in info["final_obs"]] == ["1\n", "2\n"]
        assert info["_final_obs"].all()
        assert list(info["final_info"]["step"]) == [2, 2]
        assert set(info["episode_id"]).isdisjoint(first_ids)
        obs, *_ = envs.step(("print(a)", "print('fresh')"))
        assert "NameError" in obs["stderr"][0] and obs["stdout"][1] == "fresh\n"


def test_next_step_autoreset_ignores_the_action_after_the_end():
    with CodingVectorEnv(2, autoreset_mode="NextStep", max_episode_steps=1) as envs:
        envs.reset(seed=0)
        _, _, _, truncated, _ = envs.step(("a = 1", "a = 1"))
        assert truncated.all()
        obs, rewards, _, truncated, info = envs.step(("print('ignored')", "print('ignored')"))
        assert obs["stdout"] == ("", "") and not truncated.any()
        assert list(info["step"]) == [0, 0]


def test_disabled_autoreset_needs_an_explicit_partial_reset():
    with CodingVectorEnv(2, autoreset_mode=AutoresetMode.DISABLED, max_episode_steps=1) as envs:
        envs.reset(seed=0)
        envs.step(("a = 1", "a = 2"))
        with pytest.raises(ValueError, match=r"reset_mask"):
            envs.step(("print(a)", "print(a)"))
        envs.reset(options={"reset_mask": np.array([True, False])})
        with pytest.raises(ValueError, match=r"Sub-envs \[1\]"):
            envs.step(("print(a)", "print(a)"))


def test_a_bad_action_is_refused_before_any_env_steps():
    with CodingVectorEnv(2) as envs:
        _, info = envs.reset(seed=0)
        with pytest.raises(InvalidAction, match="got bytes"):
            envs.step(("x = 1", b"x = 2"))
        with pytest.raises(ValueError, match="Expected 2 actions"):
            envs.step(("x = 1",))
        with pytest.raises(TypeError, match="tuple or list of 2 programs"):
            envs.step("x = 1")
        *_, info = envs.step(("print(1)", "print(2)"))
        assert list(info["step"]) == [1, 1]


def test_tasks_work_in_the_vector_env():
    with CodingVectorEnv(2, tasks="builtin", timeout_s=5.0) as envs:
        obs, info = envs.reset(seed=0, options=None)
        tasks = envs.get_attr("task")
        assert list(info["task_id"]) == [task.task_id for task in tasks]
        assert obs["prompt"] == tuple(task.prompt for task in tasks)
        obs, rewards, terminated, _, info = envs.step((tasks[0].solution, "pass"))
        assert rewards[0] == 1.0 and terminated[0] and not terminated[1]
        assert info["_final_obs"][0] and not info["_final_obs"][1]
        final = info["final_info"]
        assert final["_tests_passed"][0] and final["tests_passed"][0] == final["tests_total"][0]


def test_call_get_attr_set_attr_and_render():
    with CodingVectorEnv(2, render_mode="ansi") as envs:
        envs.reset(seed=0)
        envs.step(("print('hi')", "print('ho')"))
        assert envs.call("render")[0].startswith(">>> print('hi')\nhi\n")
        assert envs.render()[1].startswith(">>> print('ho')\nho\n")
        envs.set_attr("max_code_length", [5, 6])
        assert envs.get_attr("max_code_length") == (5, 6)


class _EchoBackend:
    """A backend that is not local: echoes the code as output."""

    def reset(self) -> None:
        pass

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        if code == "fail":
            raise BackendError("unreachable")
        return ExecResult(stdout=code)

    def describe(self) -> dict:
        return {"backend": "echo"}

    def close(self) -> None:
        pass


def test_other_backends_are_stepped_through_the_backend_interface():
    with CodingVectorEnv(1, backend=_EchoBackend()) as envs:
        envs.reset(seed=0)
        obs, _, _, truncated, info = envs.step(["hello"])
        assert obs["stdout"] == ("hello",) and not truncated[0]
        _, _, _, truncated, info = envs.step(["fail"])
        assert truncated[0] and info["final_info"]["infra_error"][0] == "unreachable"


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_envs must be a positive int"):
        CodingVectorEnv(0)
    with pytest.raises(ValueError, match="max_episode_steps must be positive"):
        CodingVectorEnv(1, max_episode_steps=0)


@pytest.mark.parametrize("num_envs", [1, 2])
def test_a_single_env_follows_the_stepping_thread_and_several_run_anywhere(num_envs,
                                                                             monkeypatch):
    # One env is stepped as CodingEnv.step steps it (see sandbox/affinity.py); the workers of
    # several must spread over the CPUs. No step outlasts a 1 s quiet window by chance.
    monkeypatch.setattr(steps, "QUIET_S", 1.0)
    envs = gym.make_vec("CodingEnv-v0", num_envs=num_envs, timeout_s=5.0)
    cpu = min(os.sched_getaffinity(0))
    try:
        envs.reset(seed=0)
        observations, *_ = in_thread(lambda: envs.step(["print(1)"] * num_envs), cpu)
        assert observations["stdout"] == ("1\n",) * num_envs
        pids = [env.backend.worker_pid for env in envs.envs]
        seen = [(os.sched_getaffinity(pid), os.sched_getscheduler(pid)) for pid in pids]
    finally:
        envs.close()
    if num_envs == 1:
        assert seen == [({cpu}, os.SCHED_IDLE)]
    else:
        assert seen == [(os.sched_getaffinity(0), os.SCHED_OTHER)] * num_envs


def test_a_single_env_stepped_while_another_thread_steps_an_env_runs_anywhere(monkeypatch):
    # Threads that step envs at the same time: their workers must spread over the CPUs, as
    # for CodingEnv (tests/sandbox/test_affinity.py).
    monkeypatch.setattr(steps, "QUIET_S", 1.0)
    envs = gym.make_vec("CodingEnv-v0", num_envs=1, timeout_s=5.0)
    other = CodingEnv(timeout_s=5.0)
    cpu = min(os.sched_getaffinity(0))
    try:
        envs.reset(seed=0)
        other.reset(seed=0)
        busy = threading.Thread(target=other.step, args=("import time\ntime.sleep(0.5)",))
        busy.start()
        try:
            time.sleep(0.1)  # the other thread is inside its step
            in_thread(lambda: envs.step(["print(1)"]), cpu)
            pid = envs.envs[0].backend.worker_pid
            assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
            assert os.sched_getscheduler(pid) != os.SCHED_IDLE
        finally:
            busy.join()
        in_thread(lambda: envs.step(["print(2)"]), cpu)  # alone again
        assert (os.sched_getaffinity(pid), os.sched_getscheduler(pid)) == ({cpu}, os.SCHED_IDLE)
    finally:
        envs.close()
        other.close()
