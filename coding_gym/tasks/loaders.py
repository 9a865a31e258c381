"""Task loaders: the built-in suite, and local JSONL files in coding_gym's, HumanEval's or
MBPP's format. Nothing is downloaded."""

from __future__ import annotations

import ast
import builtins
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib import resources
from typing import Any

from coding_gym.tasks.task import AssertTest, Task

#: The package resource holding the built-in suite.
BUILTIN_RESOURCE = "data/builtin.jsonl"


def load_builtin() -> list[Task]:
    """The built-in suite: original problems with reference solutions, graded by
    :class:`~coding_gym.tasks.CallTest` (function tasks) or :class:`~coding_gym.tasks.IOTest`
    (stdin tasks)."""
    text = resources.files("coding_gym.tasks").joinpath(BUILTIN_RESOURCE).read_text("utf-8")
    return [Task.from_dict(row) for row in _rows(text.splitlines(), "the built-in suite")]


def load_tasks(path: str | os.PathLike[str]) -> list[Task]:
    """Tasks from a JSONL file in coding_gym's format (see :meth:`Task.from_dict`)."""
    return _load(path, Task.from_dict)


def load_humaneval(path: str | os.PathLike[str]) -> list[Task]:
    """Tasks from a JSONL file in the HumanEval format.

    Each row has ``task_id``, ``prompt`` (the function's signature and docstring),
    ``entry_point``, ``test`` (source defining ``check(candidate)``) and optionally
    ``canonical_solution``. Every top-level statement of ``check`` that contains an
    ``assert`` becomes one :class:`AssertTest` (together with the statements before it that
    assert nothing), so a program earns partial credit; the rest of ``test`` becomes the
    task's setup. The agent sees ``prompt`` and must write the whole function; the reference
    solution is ``prompt + canonical_solution``.
    """
    return _load(path, _humaneval_task)


def load_mbpp(path: str | os.PathLike[str]) -> list[Task]:
    """Tasks from a JSONL file in the MBPP format.

    Each row has ``task_id``, ``text`` (the problem), ``code`` (a reference solution),
    ``test_list`` (assert statements, one test each) and optionally ``test_setup_code``. The
    prompt is the text followed by the tests, as in MBPP's own prompts (they name the
    function); the entry point is the function the first test calls.
    """
    return _load(path, _mbpp_task)


def load_any(path: str | os.PathLike[str]) -> list[Task]:
    """Tasks from a JSONL file in any of the three formats, told apart by the first row's
    keys (``tests``: coding_gym; ``test`` and ``entry_point``: HumanEval; ``test_list``:
    MBPP)."""
    rows = list(_read(path))
    if not rows:
        raise ValueError(f"{os.fspath(path)} holds no tasks")
    keys = set(rows[0])
    parse: Callable[[Mapping[str, Any]], Task]
    if "tests" in keys:
        parse = Task.from_dict
    elif {"test", "entry_point"} <= keys:
        parse = _humaneval_task
    elif "test_list" in keys:
        parse = _mbpp_task
    else:
        raise ValueError(
            f"{os.fspath(path)}: cannot tell the format from the keys {sorted(keys)}; expected "
            "'tests' (coding_gym), 'test' and 'entry_point' (HumanEval) or 'test_list' (MBPP)"
        )
    return _unique([parse(row) for row in rows], path)


def resolve_tasks(spec: str | os.PathLike[str] | Sequence[Task]) -> list[Task]:
    """Tasks from ``"builtin"``, a JSONL path (any format) or a sequence of :class:`Task`."""
    if isinstance(spec, str) and spec == "builtin":
        return load_builtin()
    if isinstance(spec, (str, os.PathLike)):
        return load_any(spec)
    tasks = list(spec)
    for task in tasks:
        if not isinstance(task, Task):
            raise TypeError(
                f"Expected tasks to be 'builtin', a path to a JSONL file or a list of Task, "
                f"got an item of type {type(task).__name__}"
            )
    if not tasks:
        raise ValueError("Expected at least one task, got an empty list")
    return _unique(tasks, "the task list")


def _load(path: str | os.PathLike[str], parse: Callable[[Mapping[str, Any]], Task]) -> list[Task]:
    return _unique([parse(row) for row in _read(path)], path)


def _read(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        yield from _rows(f, os.fspath(path))


def _rows(lines: Any, source: str) -> Iterator[dict[str, Any]]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"{source}, line {number}: not valid JSON: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{source}, line {number}: expected a JSON object, got {row!r:.60}")
        yield row


def _unique(tasks: list[Task], source: str | os.PathLike[str]) -> list[Task]:
    seen: set[str] = set()
    for task in tasks:
        if task.task_id in seen:
            raise ValueError(f"{os.fspath(source)}: task_id {task.task_id!r} appears twice")
        seen.add(task.task_id)
    return tasks


def _require(row: Mapping[str, Any], keys: Sequence[str], kind: str) -> None:
    missing = [key for key in keys if key not in row]
    if missing:
        raise ValueError(
            f"{kind} row {row.get('task_id', '?')!r} lacks the keys {missing}; got {sorted(row)}"
        )


def _humaneval_task(row: Mapping[str, Any]) -> Task:
    _require(row, ("task_id", "prompt", "entry_point", "test"), "HumanEval")
    setup, tests = split_check(str(row["test"]))
    solution = row.get("canonical_solution")
    return Task(
        task_id=str(row["task_id"]),
        prompt=str(row["prompt"]),
        tests=tests,
        entry_point=str(row["entry_point"]),
        setup=setup,
        solution=None if solution is None else str(row["prompt"]) + str(solution),
    )


def split_check(test_source: str) -> tuple[str, tuple[AssertTest, ...]]:
    """Split HumanEval's ``test`` source into setup code and one test per assertion.

    Statements of ``check``'s body that assert nothing run before the next one that does.
    When the body cannot be split (it returns, yields, or declares names nonlocal), the whole
    call ``check(candidate)`` is the single test.
    """
    module = ast.parse(test_source)
    checks = [n for n in module.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        raise ValueError("HumanEval test source defines no function check(candidate)")
    check = checks[-1]
    whole = (test_source, (AssertTest("check(candidate)"),))
    if len(check.args.args) != 1 or _escapes_body(check):
        return whole
    setup = [node for node in module.body if node is not check]
    param = check.args.args[0].arg
    if param != "candidate":
        setup.append(ast.parse(f"{param} = candidate").body[0])
    chunks: list[str] = []
    pending: list[ast.stmt] = []
    for statement in check.body:
        pending.append(statement)
        if any(isinstance(node, ast.Assert) for node in ast.walk(statement)):
            chunks.append(ast.unparse(ast.Module(body=pending, type_ignores=[])))
            pending = []
    if not chunks:
        return whole
    if pending:
        chunks[-1] += "\n" + ast.unparse(ast.Module(body=pending, type_ignores=[]))
    return ast.unparse(ast.Module(body=setup, type_ignores=[])), tuple(map(AssertTest, chunks))


def _escapes_body(function: ast.FunctionDef) -> bool:
    """Whether the body uses statements that mean something else outside a function."""
    scopes = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
    escaping = (ast.Return, ast.Yield, ast.YieldFrom, ast.Await, ast.Nonlocal, ast.Global)
    stack: list[ast.AST] = list(function.body)
    while stack:
        node = stack.pop()
        if isinstance(node, escaping):
            return True
        if not isinstance(node, scopes):
            stack.extend(ast.iter_child_nodes(node))
    return False


def _mbpp_task(row: Mapping[str, Any]) -> Task:
    _require(row, ("task_id", "text", "test_list"), "MBPP")
    asserts = [str(t) for t in row["test_list"]]
    if not asserts:
        raise ValueError(f"MBPP row {row['task_id']!r} has an empty test_list")
    solution = row.get("code")
    entry_point = _called_function(asserts, None if solution is None else str(solution))
    prompt = f"{row['text']}\n\nYour code should pass these tests:\n\n" + "\n".join(asserts)
    return Task(
        task_id=str(row["task_id"]),
        prompt=prompt,
        tests=tuple(AssertTest(code) for code in asserts),
        entry_point=entry_point,
        setup=str(row.get("test_setup_code") or ""),
        solution=None if solution is None else str(solution),
    )


def _called_function(asserts: Sequence[str], solution: str | None) -> str:
    """The function the tests exercise: one the solution defines, else the first called name
    that is not a builtin."""
    defined: set[str] = set()
    if solution is not None:
        try:
            defined = {node.name for node in ast.parse(solution).body
                       if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        except SyntaxError:
            pass
    called = [
        node.func.id
        for node in ast.walk(ast.parse(asserts[0]))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    ]
    for name in called:
        if name in defined:
            return name
    for name in called:
        if not hasattr(builtins, name):
            return name
    raise ValueError(f"cannot tell which function the test {asserts[0]!r} calls")
