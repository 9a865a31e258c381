"""Tasks graded by tests: the built-in suite, HumanEval / MBPP loaders, and the grader.

    >>> from coding_gym.tasks import Grader, load_builtin
    >>> tasks = load_builtin()
    >>> with Grader() as grader:
    ...     report = grader.grade(tasks[0], "def sum_list(nums):\\n    return sum(nums)\\n")
    >>> report.fraction
    1.0
"""

from __future__ import annotations

from coding_gym.tasks.grading import Grader, GradeReport, TestResult, grade_many
from coding_gym.tasks.loaders import (
    load_any,
    load_builtin,
    load_humaneval,
    load_mbpp,
    load_tasks,
    resolve_tasks,
)
from coding_gym.tasks.task import AssertTest, CallTest, IOTest, Task, Test

__all__ = [
    "AssertTest",
    "CallTest",
    "GradeReport",
    "Grader",
    "IOTest",
    "Task",
    "Test",
    "TestResult",
    "grade_many",
    "load_any",
    "load_builtin",
    "load_humaneval",
    "load_mbpp",
    "load_tasks",
    "resolve_tasks",
]
