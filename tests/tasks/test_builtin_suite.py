"""Every built-in task: its reference solution scores 1.0, an empty program 0.0."""

from __future__ import annotations

import pytest

from coding_gym.tasks import grade_many, load_builtin

TASKS = load_builtin()


@pytest.fixture(scope="module")
def reports():
    # Two graders in parallel, one fresh worker per grading: about 100 gradings in seconds.
    jobs = [(task, task.solution) for task in TASKS] + [(task, "") for task in TASKS]
    graded = grade_many(jobs, workers=2)
    return {task.task_id: (graded[i], graded[i + len(TASKS)]) for i, task in enumerate(TASKS)}


@pytest.mark.parametrize("task", TASKS, ids=[t.task_id for t in TASKS])
def test_reference_solution_passes_and_empty_program_fails(task, reports):
    solution, empty = reports[task.task_id]
    failures = [r.message for r in solution.results if not r.passed]
    assert solution.fraction == 1.0, failures
    assert empty.fraction == 0.0 and empty.passed == 0
