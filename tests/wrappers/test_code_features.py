"""CodeFeatures: numeric observations from text, and SB3's checker on the wrapper stack."""

from __future__ import annotations

import subprocess
import sys
import warnings

import gymnasium as gym
import numpy as np
import pytest

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.env import CodingEnv
from coding_gym.wrappers import CodeFeatures, SnippetActions


def test_layout_and_values():
    with CodingEnv(tasks="builtin") as base:
        env = CodeFeatures(base, buckets=32)
        parts = env.feature_slices
        assert list(parts) == ["exit_code", "prompt", "stdout", "stderr", "step"]
        assert env.observation_space.shape == (256 + 3 * 32 + 1,)
        obs, _ = env.reset(seed=0)
        assert obs.dtype == np.float32 and env.observation_space.contains(obs)
        assert obs[parts["exit_code"]][0] == 1.0 and obs[parts["exit_code"]].sum() == 1.0
        assert np.linalg.norm(obs[parts["prompt"]]) == pytest.approx(1.0)
        assert not obs[parts["stdout"]].any() and obs[parts["step"]][0] == 0.0
        obs, *_ = env.step("import sys; print('hello world'); sys.exit(3)")
        assert obs[parts["exit_code"]][3] == 1.0
        assert np.linalg.norm(obs[parts["stdout"]]) == pytest.approx(1.0)
        assert obs[parts["step"]][0] == pytest.approx(np.log(2))
        obs, _ = env.reset()
        assert obs[parts["step"]][0] == 0.0


def test_free_execution_has_no_prompt_block():
    with CodingEnv() as base:
        env = CodeFeatures(base)
        assert "prompt" not in env.feature_slices
        assert env.observation_space.shape == (256 + 2 * 256 + 1,)


def test_bag_is_case_insensitive_and_counts_tokens():
    with CodingEnv() as base:
        env = CodeFeatures(base, buckets=64)
        assert np.array_equal(env.bag("Print x"), env.bag("print X"))
        assert not np.array_equal(env.bag("a a b"), env.bag("a b b"))
        assert not env.bag("   \n").any()


def test_hash_is_stable_across_processes():
    # Python's hash() of str changes with PYTHONHASHSEED; the features must not.
    script = ("from coding_gym.wrappers.features import CodeFeatures\n"
              "from coding_gym.env import CodingEnv\n"
              "env = CodeFeatures(CodingEnv(), buckets=97)\n"
              "print(list(env.bag('def solve(): return 42').nonzero()[0]))\n"
              "env.close()\n")
    outputs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1


def test_rejects_other_observation_spaces():
    with pytest.raises(ValueError, match="expects a CodingEnv observation space"):
        CodeFeatures(gym.make("CartPole-v1"))


def test_sb3_check_env_passes_on_the_stack():
    from stable_baselines3.common.env_checker import check_env

    snippets = ["def sum_list(nums):\n    return sum(nums)", "print('hi')", "1/0"]
    env = CodeFeatures(SnippetActions(gym.make("CodingEnv-v0", tasks="builtin",
                                               max_episode_steps=2), snippets))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env)
    finally:
        env.close()
