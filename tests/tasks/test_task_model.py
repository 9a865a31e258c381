"""Task and its tests: validation and the coding_gym JSONL row format."""

from __future__ import annotations

import pytest

from coding_gym.tasks import AssertTest, CallTest, IOTest, Task


def test_from_dict_reads_every_kind_of_test():
    task = Task.from_dict({
        "task_id": "t/mixed", "prompt": "p", "entry_point": "f",
        "tests": [{"args": [1, [2]], "expected": {"a": 1}},
                  {"stdin": "in", "stdout": "out"},
                  {"assert": "assert f(1) == 2"}],
        "solution": "def f(x, y=None): return {'a': 1}", "difficulty": "easy", "tags": ["x"],
    })
    assert task.tests == (CallTest((1, [2]), {"a": 1}), IOTest("in", "out"),
                          AssertTest("assert f(1) == 2"))
    assert task.tags == ("x",) and task.difficulty == "easy"


def test_from_dict_null_entry_point_is_a_stdin_task():
    task = Task.from_dict({"task_id": "t/io", "prompt": "p", "entry_point": None,
                           "tests": [{"stdin": "", "stdout": "1\n"}]})
    assert task.entry_point is None


def test_from_dict_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"task 't/x' lacks the keys \['tests'\]"):
        Task.from_dict({"task_id": "t/x", "prompt": "p"})
    with pytest.raises(ValueError, match="expected each test to be"):
        Task.from_dict({"task_id": "t/x", "prompt": "p", "tests": [{"input": 1}]})


def test_call_test_needs_json_data():
    with pytest.raises(ValueError, match="CallTest.expected must be JSON data"):
        CallTest((1,), {1, 2})
    with pytest.raises(ValueError, match="CallTest.args must be JSON data"):
        CallTest((float("nan"),), 1)


def test_task_needs_tests_and_an_entry_point_for_function_tests():
    with pytest.raises(ValueError, match="has no tests"):
        Task("t/empty", "p", ())
    with pytest.raises(ValueError, match="has a CallTest but no entry_point"):
        Task("t/call", "p", (CallTest((1,), 1),))
    with pytest.raises(TypeError, match="expected CallTest, IOTest or AssertTest, got dict"):
        Task("t/bad", "p", ({"args": [], "expected": 1},), entry_point="f")  # type: ignore[arg-type]
