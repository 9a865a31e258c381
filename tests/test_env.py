"""CodingEnv: the Gymnasium contract, its manual, errors, and vector envs."""

from __future__ import annotations

import re
import warnings

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import ResetNeeded
from gymnasium.utils.env_checker import check_env

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.env import CodingEnv
from coding_gym.errors import InvalidAction, SharedMemoryUnsupported
from coding_gym.models import ExecResult


@pytest.fixture
def env():
    e = gym.make("CodingEnv-v0", timeout_s=2.0)
    yield e
    e.close()


def test_check_env_passes_with_warnings_as_errors():
    env = gym.make("CodingEnv-v0")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env.unwrapped)
    finally:
        env.close()


def test_step_observation_and_persistence(env):
    obs, info = env.reset(seed=0)
    assert obs == {"stdout": "", "stderr": "", "exit_code": 0}
    assert info["step"] == 0
    env.step("counter = 10")
    obs, reward, terminated, truncated, info = env.step("counter += 1\nprint(counter)")
    assert obs == {"stdout": "11\n", "stderr": "", "exit_code": 0}
    assert (reward, terminated, truncated) == (0.0, False, False)
    assert info["step"] == 2
    assert env.observation_space.contains(obs)


def test_reset_forgets_variables(env):
    env.reset()
    env.step("secret = 1")
    env.reset()
    obs, *_ = env.step("print(secret)")
    assert obs["exit_code"] == 1 and "NameError" in obs["stderr"]


def test_seeded_reset_repeats_episode_id(env):
    _, first = env.reset(seed=123)
    _, second = env.reset(seed=123)
    _, third = env.reset()
    assert first["episode_id"] == second["episode_id"] != third["episode_id"]


def _documented_info_keys(section: str, part: int = 0) -> set[str]:
    """Keys listed in a docstring section; part 1 is the list after "With ``tasks``"."""
    doc = CodingEnv.__doc__ or ""
    body = doc.split(f"## {section}", 1)[1].split("\n    ## ", 1)[0]
    body = body.split("With ``tasks``, every ``step`` also returns:")[part]
    return set(re.findall(r"^\s+- ``(\w+)``:", body, flags=re.MULTILINE))


def test_information_section_matches_step_info(env):
    documented = _documented_info_keys("Information")
    _, reset_info = env.reset()
    *_, info = env.step("print(1)")
    assert documented == set(info), f"documented {documented} != returned {set(info)}"
    assert set(reset_info) <= documented
    assert "``episode_id`` and ``step``" in CodingEnv.__doc__


def test_docstring_has_gymnasium_sections():
    for section in ("Description", "Action Space", "Observation Space", "Rewards",
                    "Starting State", "Episode End", "Arguments", "Information",
                    "Version History"):
        assert f"## {section}" in CodingEnv.__doc__


@pytest.mark.parametrize(
    ("action", "message"),
    [(b"print(1)", r"got bytes \(b'print\(1\)'\)\. Decode it first: action.decode\(\)"),
     (None, r"got NoneType \(None\)\. Pass the program's source text as a str"),
     (42, r"got int \(42\)")],
)
def test_non_str_action_raises_clear_error_and_env_survives(env, action, message):
    env.reset()
    env.step("x = 5")
    with pytest.raises(InvalidAction, match=message):
        env.step(action)
    with pytest.raises(TypeError):
        env.step(action)
    obs, *_ = env.step("print(x)")
    assert obs["stdout"] == "5\n"


def test_too_long_action_is_rejected():
    with CodingEnv(max_code_length=10) as env:
        env.reset()
        with pytest.raises(InvalidAction, match="at most max_code_length=10"):
            env.step("print('much too long')")


def test_step_before_reset():
    with CodingEnv() as env, pytest.raises(ResetNeeded):
        env.step("print(1)")


def test_timeout_info(env):
    env.reset()
    env.step("x = 1")
    *_, info = env.step("import time; time.sleep(10)")
    assert info["kill_reason"] == "timeout" and info["state_lost"] is False
    obs, *_, info = env.step("sum(range(10**12))")
    assert info["kill_reason"] == "timeout" and info["state_lost"] is True
    assert obs["exit_code"] == 137


def test_truncation_flag_in_info():
    with CodingEnv(max_output_bytes=1000) as env:
        env.reset()
        obs, *_, info = env.step("print('y' * 5000)")
        assert info["stdout_truncated"] and len(obs["stdout"]) == 1000
        assert env.observation_space.contains(obs)


def test_max_episode_steps_truncates():
    env = gym.make("CodingEnv-v0", max_episode_steps=2)
    env.reset()
    assert env.step("1")[3] is False
    assert env.step("1")[3] is True
    env.close()


def test_render_ansi():
    with CodingEnv(render_mode="ansi") as env:
        env.reset()
        env.step("print('hi')")
        assert env.render() == ">>> print('hi')\nhi\n[exit code 0, " + \
            env.render().split("[exit code 0, ")[1]


def test_bad_render_mode():
    with pytest.raises(ValueError, match="render_mode must be None or one of"):
        CodingEnv(render_mode="human")


def test_unknown_backend():
    with pytest.raises(ValueError, match="Unknown backend 'nope'"):
        CodingEnv(backend="nope")


class _BrokenBackend:
    """A backend whose infrastructure fails on every run."""

    def reset(self) -> None:
        pass

    def run(self, code: str, *, timeout_s: float | None = None) -> ExecResult:
        from coding_gym.errors import BackendError

        raise BackendError("server unreachable")

    def describe(self) -> dict:
        return {"backend": "broken"}

    def close(self) -> None:
        pass


def test_infra_failure_truncates_without_reward():
    with CodingEnv(backend=_BrokenBackend()) as env:
        env.reset()
        obs, reward, terminated, truncated, info = env.step("print(1)")
        assert (reward, terminated, truncated) == (0.0, False, True)
        assert info["infra_error"] == "server unreachable"
        assert env.observation_space.contains(obs)


def test_close_twice_and_context_manager():
    env = CodingEnv()
    env.reset()
    env.close()
    env.close()


def _make():
    return gym.make("CodingEnv-v0", timeout_s=5.0)


@pytest.mark.parametrize("vector_cls", [gym.vector.SyncVectorEnv, gym.vector.AsyncVectorEnv])
def test_vector_envs_with_four_envs(vector_cls):
    kwargs = {"shared_memory": False} if vector_cls is gym.vector.AsyncVectorEnv else {}
    envs = vector_cls([_make] * 4, **kwargs)
    try:
        envs.reset(seed=0)
        envs.step(tuple(f"x = {i}" for i in range(4)))
        obs, rewards, terminated, truncated, info = envs.step(
            ("print(x * 10)", "print('é\\x00')", "1/0", "import sys; sys.exit(7)")
        )
        assert obs["stdout"][:2] == ("0\n", "é\x00\n")
        assert "ZeroDivisionError" in obs["stderr"][2]
        assert list(obs["exit_code"]) == [0, 0, 1, 7]
        assert rewards.dtype == np.float64 and not terminated.any() and not truncated.any()
    finally:
        envs.close()


def test_async_vector_env_with_shared_memory_fails_clearly():
    with pytest.raises(SharedMemoryUnsupported, match="shared_memory=False"):
        gym.vector.AsyncVectorEnv([_make] * 2)
