"""Loaders: the built-in suite, and HumanEval / MBPP files written here as fixtures."""

from __future__ import annotations

import json

import pytest

from coding_gym.tasks import (
    AssertTest,
    CallTest,
    Grader,
    IOTest,
    Task,
    load_any,
    load_builtin,
    load_humaneval,
    load_mbpp,
    load_tasks,
    resolve_tasks,
)
from coding_gym.tasks.loaders import split_check

HUMANEVAL_ROWS = [
    {
        "task_id": "Fixture/0",
        "prompt": 'def middle_char(word: str) -> str:\n    """Return the middle character of '
                  'an odd-length word."""\n',
        "canonical_solution": "    return word[len(word) // 2]\n",
        "entry_point": "middle_char",
        "test": "METADATA = {'author': 'fixture'}\n\n\n"
                "def check(candidate):\n"
                "    assert candidate('abc') == 'b'\n"
                "    word = 'level'\n"
                "    assert candidate(word) == 'v'\n"
                "    for w in ['x', 'xyz']:\n"
                "        assert candidate(w) in w\n",
    },
    {
        "task_id": "Fixture/1",
        "prompt": "def halve(n: float) -> float:\n",
        "canonical_solution": "    return n / 2\n",
        "entry_point": "halve",
        "test": "import math\n\ndef check(f):\n    assert math.isclose(f(3), 1.5)\n",
    },
]

MBPP_ROWS = [
    {
        "task_id": 901,
        "text": "Write a function to count the words of a sentence that start with a capital "
                "letter.",
        "code": "def count_capitalised(sentence):\n"
                "    return sum(w[:1].isupper() for w in sentence.split())",
        "test_list": ["assert count_capitalised('Ada met Bob') == 2",
                      "assert count_capitalised('') == 0",
                      "assert count_capitalised(GREETING) == 1"],
        "test_setup_code": "GREETING = 'Hello there'",
        "challenge_test_list": [],
    },
    {
        "task_id": 902,
        "text": "Write a function that returns the distinct items of a list as a set.",
        "code": "def distinct(items):\n    return set(items)",
        "test_list": ["assert distinct([1, 1, 2]) == {1, 2}"],
    },
]


def _write(tmp_path, name, rows):
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def grader():
    with Grader() as g:
        yield g


def test_humaneval_loader_splits_check_into_tests(tmp_path, grader):
    tasks = load_humaneval(_write(tmp_path, "he.jsonl", HUMANEVAL_ROWS))
    first = tasks[0]
    assert (first.task_id, first.entry_point) == ("Fixture/0", "middle_char")
    assert first.prompt == HUMANEVAL_ROWS[0]["prompt"]
    assert len(first.tests) == 3 and "METADATA" in first.setup
    assert "word = 'level'" in first.tests[1].code
    assert grader.grade(first, first.solution).fraction == 1.0
    wrong = "def middle_char(word):\n    return word[0]\n"
    assert [r.passed for r in grader.grade(first, wrong).results] == [False, False, True]
    halve = tasks[1]
    assert halve.tests == (AssertTest("assert math.isclose(f(3), 1.5)"),)
    assert grader.grade(halve, halve.solution).fraction == 1.0
    assert grader.grade(halve, "def halve(n):\n    return n // 2\n").fraction == 0.0


def test_split_check_falls_back_to_one_test_when_the_body_returns():
    source = "def check(candidate):\n    if candidate(1) == 1:\n        return\n    assert False\n"
    setup, tests = split_check(source)
    assert tests == (AssertTest("check(candidate)"),) and setup == source


def test_split_check_keeps_nested_functions():
    source = ("def check(candidate):\n"
              "    def helper(x):\n        return x + 1\n"
              "    assert candidate(helper(1)) == 2\n")
    _, tests = split_check(source)
    assert len(tests) == 1 and "return x + 1" in tests[0].code


def test_mbpp_loader(tmp_path, grader):
    tasks = load_mbpp(_write(tmp_path, "mbpp.jsonl", MBPP_ROWS))
    count = tasks[0]
    assert (count.task_id, count.entry_point, len(count.tests)) == ("901", "count_capitalised", 3)
    assert count.prompt.startswith(MBPP_ROWS[0]["text"])
    assert "assert count_capitalised('Ada met Bob') == 2" in count.prompt
    assert grader.grade(count, count.solution).fraction == 1.0
    half = "def count_capitalised(sentence):\n    return len(sentence.split())\n"
    assert [r.passed for r in grader.grade(count, half).results] == [False, True, False]
    distinct = tasks[1]
    assert distinct.entry_point == "distinct"
    assert grader.grade(distinct, distinct.solution).fraction == 1.0


def test_load_any_tells_formats_apart(tmp_path):
    assert load_any(_write(tmp_path, "a.jsonl", HUMANEVAL_ROWS))[0].task_id == "Fixture/0"
    assert load_any(_write(tmp_path, "b.jsonl", MBPP_ROWS))[0].task_id == "901"
    ours = [{"task_id": "x/1", "prompt": "p", "entry_point": None,
             "tests": [{"stdin": "", "stdout": ""}]}]
    assert load_any(_write(tmp_path, "c.jsonl", ours))[0].tests == (IOTest("", ""),)
    assert load_tasks(tmp_path / "c.jsonl")[0].task_id == "x/1"
    with pytest.raises(ValueError, match="cannot tell the format from the keys"):
        load_any(_write(tmp_path, "d.jsonl", [{"task_id": 1, "question": "?"}]))


def test_loader_errors_point_at_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(MBPP_ROWS[0]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not valid JSON"):
        load_mbpp(path)
    with pytest.raises(ValueError, match="HumanEval row 901 lacks the keys"):
        load_humaneval(_write(tmp_path, "wrong.jsonl", MBPP_ROWS))
    with pytest.raises(ValueError, match="task_id '901' appears twice"):
        load_mbpp(_write(tmp_path, "twice.jsonl", [MBPP_ROWS[0], MBPP_ROWS[0]]))


def test_builtin_suite_shape():
    tasks = load_builtin()
    assert len(tasks) == 49 and len({t.task_id for t in tasks}) == 49
    function_tasks = [t for t in tasks if t.entry_point]
    assert len(function_tasks) == 36
    assert all(isinstance(test, CallTest) for t in function_tasks for test in t.tests)
    assert all(isinstance(test, IOTest) for t in tasks if not t.entry_point for test in t.tests)
    assert all(t.solution and t.prompt for t in tasks)


def test_resolve_tasks():
    task = Task("x/1", "p", (IOTest("", ""),))
    assert resolve_tasks([task]) == [task]
    assert len(resolve_tasks("builtin")) == 49
    with pytest.raises(TypeError, match="got an item of type str"):
        resolve_tasks(["builtin/sum_list"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="at least one task"):
        resolve_tasks([])
