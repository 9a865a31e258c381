"""``TaskEpisodes``: the task side of :class:`~coding_gym.env.CodingEnv`.

It picks the episode's task, keeps the program that is graded, grades it after each step and
turns the report into reward, termination and info. The env owns the interpreter; this owns
the grading.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np

from coding_gym.models import ExecResult
from coding_gym.tasks.grading import Grader, GradeReport
from coding_gym.tasks.task import Task

#: Gradings an env remembers; the least recently used is forgotten first.
MEMO_SIZE = 4096


class TaskEpisodes:
    """Task choice, graded program and grading for one env.

    Args:
        tasks: The tasks to sample from.
        grader: Runs the tests; closed by :meth:`close`.
        binary_reward: Reward 1.0 only when every test passes, instead of the fraction passed.
    """

    def __init__(self, tasks: Sequence[Task], grader: Grader, *, binary_reward: bool) -> None:
        self.tasks = list(tasks)
        self.by_id = {task.task_id: task for task in self.tasks}
        self.grader = grader
        self.binary_reward = binary_reward
        self.task: Task | None = None
        self._cells: list[str] = []
        self._memo: OrderedDict[tuple[str, str], GradeReport] = OrderedDict()

    def state(self) -> tuple[Task | None, list[str]]:
        """The episode's part of this object, for :meth:`CodingEnv.snapshot`."""
        return self.task, list(self._cells)

    def set_state(self, state: tuple[Task | None, list[str]]) -> None:
        self.task, cells = state
        self._cells = list(cells)

    def fork(self, grader: Grader) -> TaskEpisodes:
        """A copy in the same episode state for a forked env, grading with ``grader``."""
        clone = TaskEpisodes(self.tasks, grader, binary_reward=self.binary_reward)
        clone.set_state(self.state())
        clone._memo = OrderedDict(self._memo)
        return clone

    @property
    def max_prompt_length(self) -> int:
        return max(len(task.prompt) for task in self.tasks)

    def start(self, rng: np.random.Generator, options: dict[str, Any] | None) -> Task:
        """Choose the episode's task: ``options["task_id"]`` if given, else uniformly."""
        task_id = (options or {}).get("task_id")
        if task_id is None:
            self.task = self.tasks[int(rng.integers(len(self.tasks)))]
        elif task_id in self.by_id:
            self.task = self.by_id[task_id]
        else:
            close = difflib.get_close_matches(str(task_id), self.by_id, n=3)
            hint = f" Did you mean {close}?" if close else ""
            raise ValueError(
                f"Unknown task_id {task_id!r} in reset options; this env has "
                f"{len(self.tasks)} tasks.{hint}"
            )
        self._cells = []
        return self.task

    def program(self, code: str, result: ExecResult) -> str:
        """Record the step, and return the program graded after it.

        Function tasks: the code of the steps that ended with exit code 0, in order, since the
        interpreter last lost its state. Stdin tasks: this step's code alone.
        """
        assert self.task is not None
        if self.task.entry_point is None:
            return code
        if result.state_lost:
            self._cells = []
        elif result.exit_code == 0:
            self._cells.append(code)
        return "\n".join(self._cells) + ("\n" if self._cells else "")

    def grade(self, program: str) -> GradeReport:
        """Grade ``program`` on the episode's task.

        A program this env already graded in full on the same task is not run again (its
        report is remembered); one whose grading was cut short is.

        Raises:
            BackendError: the grading backend failed.
        """
        assert self.task is not None
        key = (self.task.task_id, program)
        report = self._memo.get(key)
        if report is not None:
            self._memo.move_to_end(key)
            return report
        report = self.grader.grade(self.task, program)
        if report.finished:
            self._memo[key] = report
            if len(self._memo) > MEMO_SIZE:
                self._memo.popitem(last=False)
        return report

    def reward(self, report: GradeReport) -> float:
        if self.binary_reward:
            return 1.0 if report.all_passed else 0.0
        return report.fraction

    def info(self, report: GradeReport | None) -> dict[str, Any]:
        """The task keys of a step's info (``report`` None: grading failed)."""
        assert self.task is not None
        return {
            "task_id": self.task.task_id,
            "tests_passed": 0 if report is None else report.passed,
            "tests_total": len(self.task.tests),
            "test_results": [] if report is None else [r.as_dict() for r in report.results],
        }

    def close(self) -> None:
        self.grader.close()
