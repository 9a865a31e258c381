"""``Task`` and its three kinds of test."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CallTest:
    """Call the entry point with ``args``; the test passes when it returns ``expected``.

    ``args`` and ``expected`` are JSON values. The result is encoded as JSON inside the sandbox
    and compared here, so ``expected`` never enters the sandbox. Equality is JSON equality: a
    tuple equals the list of its items, ``True`` never equals ``1``, dict keys are strings.
    """

    args: tuple[Any, ...]
    expected: Any

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", tuple(self.args))
        for name in ("args", "expected"):
            try:
                json.dumps(getattr(self, name), allow_nan=False)
            except (TypeError, ValueError) as e:
                raise ValueError(
                    f"CallTest.{name} must be JSON data (numbers, strings, lists, dicts with "
                    f"string keys, booleans, None), got {getattr(self, name)!r}: {e}"
                ) from e


@dataclass(frozen=True)
class IOTest:
    """Run the whole program with ``stdin`` as standard input; it passes when what it prints
    equals ``stdout``, ignoring trailing whitespace on each line and trailing blank lines, and
    it ends without an error (``sys.exit(0)`` is fine).

    The program runs as ``__main__`` in a fresh module for each test and talks through
    ``sys.stdin`` and ``sys.stdout`` (``input``, ``print``, ``sys.stdin.read``,
    ``sys.stdout.buffer``); bytes written straight to file descriptors 0 and 1 are not seen.
    At most 64 KiB of output per test is kept.
    """

    stdin: str
    stdout: str


@dataclass(frozen=True)
class AssertTest:
    """Python statements (HumanEval / MBPP style) that pass when they raise nothing.

    They run inside the sandbox after the program and the task's ``setup``, with the entry
    point bound to its own name and to ``candidate``. The entry point's results reach them as
    plain-data copies (exact ``int``, ``str``, ``list``... built by the harness), so an object
    with a rigged ``__eq__`` cannot pass an ``==`` assertion.
    """

    code: str


Test = CallTest | IOTest | AssertTest


@dataclass(frozen=True)
class Task:
    """A programming problem and the tests that grade a program written for it.

    Attributes:
        task_id: Unique identifier, for example ``"builtin/sum_list"``.
        prompt: What the agent reads.
        tests: The tests; all of one kind is usual, but kinds may be mixed.
        entry_point: Name of the function :class:`CallTest` and :class:`AssertTest` call;
            None for programs graded on standard input and output only.
        setup: Code run before :class:`AssertTest` statements (imports, helpers).
        solution: A reference program, if known.
        difficulty: Free-form label, for example ``"easy"``.
        tags: Free-form labels.
    """

    task_id: str
    prompt: str
    tests: tuple[Test, ...]
    entry_point: str | None = None
    setup: str = ""
    solution: str | None = None
    difficulty: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tests", tuple(self.tests))
        object.__setattr__(self, "tags", tuple(self.tags))
        if not self.tests:
            raise ValueError(f"Task {self.task_id!r} has no tests; a task needs at least one")
        for test in self.tests:
            if not isinstance(test, (CallTest, IOTest, AssertTest)):
                raise TypeError(
                    f"Task {self.task_id!r}: expected CallTest, IOTest or AssertTest, "
                    f"got {type(test).__name__}"
                )
            if not isinstance(test, IOTest) and not self.entry_point:
                raise ValueError(
                    f"Task {self.task_id!r} has a {type(test).__name__} but no entry_point; "
                    "name the function the tests call"
                )

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> Task:
        """A task from a row of coding_gym's JSONL format (the built-in suite's).

        Each test is ``{"args": [...], "expected": ...}``, ``{"stdin": ..., "stdout": ...}``
        or ``{"assert": "<statements>"}``.
        """
        task_id = str(row.get("task_id", "?"))
        missing = [key for key in ("task_id", "prompt", "tests") if key not in row]
        if missing:
            raise ValueError(f"task {task_id!r} lacks the keys {missing}; got {sorted(row)}")
        return cls(
            task_id=task_id,
            prompt=str(row["prompt"]),
            tests=tuple(_test_from_dict(task_id, t) for t in _sequence(row["tests"], task_id)),
            entry_point=row.get("entry_point") or None,
            setup=str(row.get("setup") or ""),
            solution=row.get("solution"),
            difficulty=row.get("difficulty"),
            tags=tuple(row.get("tags") or ()),
        )


def _sequence(value: Any, task_id: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ValueError(f"task {task_id!r}: expected 'tests' to be a list, got {value!r}")
    return value


def _test_from_dict(task_id: str, test: Any) -> Test:
    if isinstance(test, dict):
        if set(test) == {"args", "expected"} and isinstance(test["args"], list):
            return CallTest(tuple(test["args"]), test["expected"])
        if set(test) == {"stdin", "stdout"}:
            return IOTest(str(test["stdin"]), str(test["stdout"]))
        if set(test) == {"assert"}:
            return AssertTest(str(test["assert"]))
    raise ValueError(
        f"task {task_id!r}: expected each test to be {{'args': [...], 'expected': ...}}, "
        f"{{'stdin': ..., 'stdout': ...}} or {{'assert': ...}}, got {test!r}"
    )
