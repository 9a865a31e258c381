"""SnippetActions: Discrete actions that pick programs."""

from __future__ import annotations

import numpy as np
import pytest
from gymnasium import spaces

from coding_gym.env import CodingEnv
from coding_gym.tasks import CallTest, Task
from coding_gym.wrappers import SnippetActions

ONE = Task("t/one", "Define one() returning 1.", (CallTest((), 1),), entry_point="one")


def test_action_index_runs_that_snippet():
    snippets = ["def one():\n    return 2", "def one(): return 1"]
    env = SnippetActions(CodingEnv(tasks=[ONE]), snippets)
    try:
        assert env.action_space == spaces.Discrete(2)
        env.reset(seed=0)
        assert env.step(np.int64(0))[1] == 0.0
        _, reward, terminated, *_ = env.step(1)
        assert reward == 1.0 and terminated
    finally:
        env.close()


def test_free_execution_output_comes_from_the_snippet():
    with CodingEnv() as base:
        env = SnippetActions(base, ["print('a')", "print('b')"])
        env.reset()
        assert env.step(1)[0]["stdout"] == "b\n"


def test_bad_snippets_and_actions():
    with CodingEnv() as base:
        with pytest.raises(ValueError, match="non-empty sequence of str"):
            SnippetActions(base, [])
        with pytest.raises(ValueError, match="non-empty sequence of str"):
            SnippetActions(base, "print(1)")
        with pytest.raises(TypeError, match="got bytes at index 1"):
            SnippetActions(base, ["print(1)", b"print(2)"])  # type: ignore[list-item]
        env = SnippetActions(base, ["print(1)"])
        env.reset()
        with pytest.raises(ValueError, match=r"Expected an action in \[0, 1\), got 3"):
            env.step(3)
