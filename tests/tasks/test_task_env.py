"""CodingEnv with tasks: sampling, observation, reward, termination, info and infra errors."""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.env import CodingEnv
from coding_gym.errors import BackendError
from coding_gym.models import ExecResult
from coding_gym.spaces import AnyText
from coding_gym.tasks import CallTest, IOTest, Task, load_builtin
from coding_gym.tasks.grading import Grader

DOUBLE = Task("t/double", "Define double(x) returning 2 * x.",
              (CallTest((1,), 2), CallTest((5,), 10), CallTest((-2,), -4), CallTest((0,), 0)),
              entry_point="double")
SHOUT = Task("t/shout", "Print the line read from stdin in upper case.",
             (IOTest("hi\n", "HI\n"), IOTest("ok", "OK")))


@pytest.fixture
def env():
    e = CodingEnv(tasks=[DOUBLE, SHOUT], timeout_s=5.0)
    yield e
    e.close()


def test_make_with_builtin_tasks_and_check_env():
    env = gym.make("CodingEnv-v0", tasks="builtin")
    try:
        assert isinstance(env.observation_space["prompt"], AnyText)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env.unwrapped)
    finally:
        env.close()


def test_free_execution_has_no_prompt():
    with CodingEnv() as env:
        assert "prompt" not in env.observation_space.spaces
        obs, info = env.reset()
        assert "prompt" not in obs and "task_id" not in info and env.task is None


def test_seeded_sampling_is_reproducible():
    with CodingEnv(tasks="builtin") as first, CodingEnv(tasks="builtin") as second:
        ids = [first.reset(seed=7)[1]["task_id"]] + [first.reset()[1]["task_id"] for _ in range(9)]
        again = [second.reset(seed=7)[1]["task_id"]] + [second.reset()[1]["task_id"]
                                                        for _ in range(9)]
        assert ids == again
        assert len(set(ids)) > 3
        other = [second.reset(seed=8)[1]["task_id"]] + [second.reset()[1]["task_id"]
                                                        for _ in range(9)]
        assert other != ids


def test_reset_options_choose_the_task(env):
    obs, info = env.reset(options={"task_id": "t/shout"})
    assert info["task_id"] == "t/shout" and obs["prompt"] == SHOUT.prompt
    assert env.task is SHOUT
    message = r"Unknown task_id 't/dubble'.*Did you mean \['t/double'\]"
    with pytest.raises(ValueError, match=message):
        env.reset(options={"task_id": "t/dubble"})


def test_fraction_reward_termination_and_info(env):
    obs, info = env.reset(options={"task_id": "t/double"})
    assert obs["prompt"] == DOUBLE.prompt
    obs, reward, terminated, truncated, info = env.step("def double(x):\n    return abs(2 * x)")
    assert (reward, terminated, truncated) == (0.75, False, False)
    assert obs["prompt"] == DOUBLE.prompt and env.observation_space.contains(obs)
    assert (info["tests_passed"], info["tests_total"], info["task_id"]) == (3, 4, "t/double")
    assert [r["passed"] for r in info["test_results"]] == [True, True, False, True]
    assert info["test_results"][2]["message"] == "wrong answer: returned 4"
    *_, terminated, _, info = env.step("def double(x):\n    return x + x")
    assert terminated and info["tests_passed"] == 4


def test_function_task_grades_successful_steps_in_order(env):
    env.reset(options={"task_id": "t/double"})
    assert env.step("FACTOR = 2")[1] == 0.0
    assert env.step("def double(x):\n    return FACTOR * x\n1/0")[1] == 0.0  # failed: left out
    assert env.step("print(undefined_name)")[1] == 0.0
    _, reward, terminated, *_ = env.step("def double(x):\n    return FACTOR * x")
    assert reward == 1.0 and terminated


def test_lost_interpreter_state_forgets_earlier_steps():
    with CodingEnv(tasks=[DOUBLE], timeout_s=1.0) as env:
        env.reset()
        env.step("FACTOR = 2")
        *_, info = env.step("sum(range(10**12))")
        assert info["state_lost"]
        assert env.step("def double(x):\n    return FACTOR * x")[1] == 0.0


def test_stdin_task_grades_the_step_alone(env):
    env.reset(options={"task_id": "t/shout"})
    obs, reward, terminated, *_ = env.step("print(input().upper())")
    # The episode's interpreter has no stdin, so the step fails there, yet passes its tests.
    assert obs["exit_code"] == 1 and "EOFError" in obs["stderr"]
    assert reward == 1.0 and terminated
    env.reset(options={"task_id": "t/shout"})
    env.step("print(input().upper())\nprint('debug')")
    assert env.step("x = 1")[1] == 0.0


def test_binary_reward():
    with CodingEnv(tasks=[DOUBLE], binary_reward=True) as env:
        env.reset()
        assert env.step("def double(x):\n    return abs(2 * x)")[1] == 0.0
        assert env.step("def double(x):\n    return 2 * x")[1] == 1.0


def test_reward_transforms_apply_on_top_of_the_task_reward():
    with CodingEnv(tasks=[DOUBLE], reward_transforms="openenv") as env:
        env.reset()
        assert env.step("def double(x): return 2 * x")[1] == pytest.approx(1.1)


def _documented_task_keys() -> set[str]:
    doc = CodingEnv.__doc__ or ""
    body = doc.split("## Information", 1)[1].split("\n    ## ", 1)[0]
    common, tasks = body.split("With ``tasks``, every ``step`` also returns:")
    return {key for part in (common, tasks)
            for key in re.findall(r"^\s+- ``(\w+)``:", part, flags=re.MULTILINE)}


def test_information_section_matches_task_mode_info(env):
    _, reset_info = env.reset()
    *_, info = env.step("print(1)")
    assert _documented_task_keys() == set(info)
    assert set(reset_info) <= set(info)


class _FailingBackend:
    """A backend whose runs fail: the infrastructure, not the agent."""

    def reset(self) -> None:
        pass

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        raise BackendError("server unreachable")

    def describe(self) -> dict:
        return {"backend": "failing"}

    def close(self) -> None:
        pass


def test_step_infra_failure_truncates_without_reward():
    with CodingEnv(backend=_FailingBackend(), tasks=[DOUBLE]) as env:
        env.reset()
        obs, reward, terminated, truncated, info = env.step("def double(x): return 2 * x")
        assert (reward, terminated, truncated) == (0.0, False, True)
        assert info["infra_error"] == "server unreachable"
        assert info["test_results"] == [] and info["tests_passed"] == 0
        assert _documented_task_keys() == set(info)


def test_grading_infra_failure_truncates_without_reward(env):
    env.reset(options={"task_id": "t/double"})
    assert env._tasks is not None
    env._tasks.grader.close()
    env._tasks.grader = Grader(_FailingBackend())
    obs, reward, terminated, truncated, info = env.step("def double(x): return 2 * x")
    assert (reward, terminated, truncated) == (0.0, False, True)
    assert info["infra_error"] == "grading failed: server unreachable"
    assert obs["exit_code"] == 0


def test_sync_vector_env_with_tasks():
    envs = gym.make_vec("CodingEnv-v0", num_envs=2, tasks="builtin", vectorization_mode="sync")
    try:
        _, info = envs.reset(seed=3)
        solutions = {task.task_id: task.solution for task in load_builtin()}
        actions = tuple(solutions[task_id] for task_id in info["task_id"])
        _, rewards, terminated, truncated, _ = envs.step(actions)
        assert np.all(rewards == 1.0) and terminated.all() and not truncated.any()
    finally:
        envs.close()


class _CountingGrader(Grader):
    def __init__(self) -> None:
        super().__init__()
        self.programs: list[str] = []

    def grade(self, task, program):
        self.programs.append(program)
        return super().grade(task, program)


def test_finished_gradings_are_remembered_and_cut_short_ones_are_not(env):
    assert env._tasks is not None
    env._tasks.grader.close()
    counting = env._tasks.grader = _CountingGrader()
    solution, exits = "def double(x): return 2 * x", "import os\nos._exit(0)"
    for _ in range(2):
        env.reset(options={"task_id": "t/double"})
        assert env.step(solution)[1] == 1.0
    assert counting.programs == [solution + "\n"]
    env.reset(options={"task_id": "t/shout"})
    for _ in range(2):
        assert env.step(exits)[1] == 0.0
    assert counting.programs[1:] == [exits, exits]
