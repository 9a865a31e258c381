"""Reward transforms: OpenEnv parity values, composition, and their use by CodingEnv."""

from __future__ import annotations

import pytest

from coding_gym.env import CodingEnv
from coding_gym.models import ExecResult
from coding_gym.transforms import (
    Compose,
    ConcisenessBonus,
    SafetyPenalty,
    SyntaxPenalty,
    openenv,
    resolve,
)

OK = ExecResult()


@pytest.mark.parametrize(
    "code",
    ["import os", "import   subprocess", "eval('1')", "exec('x=1')", "__import__('sys')",
     "open('f')", "x = 1\nimport os.path\n", "print('open(')"],
)
def test_safety_penalty_matches_openenv_patterns(code):
    assert SafetyPenalty()(code, OK, 0.0) == -1.0


@pytest.mark.parametrize("code", ["print(1)", "import sys", "evaluate(1)", "opened = 1"])
def test_safety_penalty_ignores_harmless_code(code):
    assert SafetyPenalty()(code, OK, 0.25) == 0.25


def test_safety_penalty_applies_once_and_names_the_pattern():
    penalty = SafetyPenalty(penalty=-3.0)
    assert penalty("import os; eval('1'); open('x')", OK, 0.0) == -3.0
    assert penalty.violation("import subprocess") == r"import\s+subprocess"


def test_conciseness_bonus_threshold_counts_stripped_characters():
    bonus = ConcisenessBonus()
    assert bonus("x" * 100, OK, 0.0) == 0.1
    assert bonus("\n  " + "x" * 100 + "  \n", OK, 0.0) == 0.1
    assert bonus("x" * 101, OK, 0.0) == 0.0


def test_syntax_penalty():
    assert SyntaxPenalty()("def f(:", OK, 0.0) == -0.2
    assert SyntaxPenalty()("x = '\\x00'", OK, 0.0) == 0.0
    # A NUL byte in source: SyntaxError on Python 3.12+, ValueError before; penalised on both.
    assert SyntaxPenalty()("x = 1\x00", OK, 0.0) == -0.2
    assert SyntaxPenalty()("print(1)", OK, 1.0) == 1.0


@pytest.mark.parametrize(
    ("code", "reward"),
    [("print(1)", 0.1), ("import os", -0.9), ("def f(:", -0.1),
     ("import os\nprint(" + "1" * 100 + ")", -1.0), ("x = [" + "1, " * 50 + "]", 0.0),
     ("eval(", -1.1)],
)
def test_openenv_preset_parity(code, reward):
    assert openenv()(code, OK, 0.0) == pytest.approx(reward)


def test_compose_applies_in_order_and_accepts_functions():
    def double(code, result, reward):
        return reward * 2

    assert Compose([ConcisenessBonus(bonus=1.0), double])("x", OK, 0.5) == 3.0
    assert Compose([double, ConcisenessBonus(bonus=1.0)])("x", OK, 0.5) == 2.0


def test_resolve():
    assert resolve(None)("import os", OK, 0.0) == 0.0
    assert resolve("openenv")("print(1)", OK, 0.0) == pytest.approx(0.1)
    single = SyntaxPenalty()
    assert resolve(single).transforms == (single,)
    with pytest.raises(ValueError, match="Unknown reward_transforms preset 'nope'"):
        resolve("nope")
    with pytest.raises(TypeError, match="to be a callable"):
        resolve([42])  # type: ignore[list-item]


def test_free_execution_reward_is_zero_by_default():
    with CodingEnv() as env:
        env.reset()
        assert env.step("import os")[1] == 0.0


def test_free_execution_with_openenv_shaping():
    with CodingEnv(reward_transforms="openenv") as env:
        env.reset()
        assert env.step("print(1)")[1] == pytest.approx(0.1)
        assert env.step("import os")[1] == pytest.approx(-0.9)
        assert env.step("def f(:")[1] == pytest.approx(-0.1)


def test_transform_sees_the_result():
    def exit_code_reward(code, result, reward):
        return reward + result.exit_code

    with CodingEnv(reward_transforms=[exit_code_reward]) as env:
        env.reset()
        assert env.step("import sys; sys.exit(3)")[1] == 3.0
