"""Grade a JSONL file of candidate solutions against the built-in suite or a task file.

Each line of the solutions file is ``{"task_id": ..., "completion": ...}``; a task may have
several lines (samples). Tasks come from the built-in suite, or from a JSONL file in
coding_gym's, HumanEval's or MBPP's format (``--tasks path``). Every completion is graded by
the task's tests in a fresh sandbox process, on ``--workers`` processes at a time.

A completion that defines the task's entry point is graded as it is. Otherwise, when the
task's prompt is code (HumanEval's signature and docstring), the completion continues it:
the program is prompt + completion, as in HumanEval's own evaluation.

    python examples/evaluate_solutions.py solutions.jsonl
    python examples/evaluate_solutions.py samples.jsonl --tasks HumanEval.jsonl --json out.json

Prints one row per task (samples, samples passing every test, mean fraction of tests passed,
the first failure) and a last line of JSON with the totals; ``--json`` also writes every
result to a file.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import time
from collections import defaultdict
from typing import Any

from coding_gym.tasks import Task, grade_many, resolve_tasks


def read_completions(path: str) -> list[dict[str, str]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or not {"task_id", "completion"} <= set(row):
                sys.exit(f"{path}, line {number}: expected an object with 'task_id' and "
                         f"'completion', got {line.strip()[:80]}")
            rows.append({"task_id": str(row["task_id"]), "completion": str(row["completion"])})
    return rows


def program_for(task: Task, completion: str) -> str:
    """The program graded for ``completion`` (see the module docstring)."""
    if task.entry_point is None or _defines(completion, task.entry_point):
        return completion
    if _is_code(task.prompt):
        return task.prompt + completion
    return completion


def _defines(source: str, name: str) -> bool:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return False
    return any(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == name
               for node in tree.body)


def _is_code(text: str) -> bool:
    try:
        ast.parse(text + "    pass\n")
    except (SyntaxError, ValueError):
        return False
    return True


def evaluate(tasks: list[Task], rows: list[dict[str, str]], workers: int) -> list[dict[str, Any]]:
    by_id = {task.task_id: task for task in tasks}
    unknown = sorted({row["task_id"] for row in rows} - set(by_id))
    if unknown:
        sys.exit(f"unknown task ids (not in the task set): {unknown[:10]}")
    jobs = [(by_id[row["task_id"]], program_for(by_id[row["task_id"]], row["completion"]))
            for row in rows]
    reports = grade_many(jobs, workers=workers)
    return [
        {"task_id": report.task_id, "passed": report.passed, "total": report.total,
         "all_passed": report.all_passed,
         "failures": [r.message for r in report.results if not r.passed]}
        for report in reports
    ]


def summarize(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        by_task[result["task_id"]].append(result)
    print(f"{'task':<32} {'samples':>7} {'pass':>5} {'tests':>6}  first failure")
    for task_id in sorted(by_task):
        samples = by_task[task_id]
        passing = sum(s["all_passed"] for s in samples)
        fraction = sum(s["passed"] / s["total"] for s in samples) / len(samples)
        failure = next((f for s in samples for f in s["failures"]), "")
        print(f"{task_id:<32} {len(samples):>7} {passing:>5} {fraction:>6.0%}  {failure[:60]}")
    totals = {
        "tasks": len(by_task),
        "samples": len(results),
        "pass_at_1": sum(r["all_passed"] for r in results) / max(len(results), 1),
        "mean_test_fraction": sum(r["passed"] / r["total"] for r in results)
        / max(len(results), 1),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(totals))
    return totals


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("solutions", help="JSONL file of {task_id, completion}")
    parser.add_argument("--tasks", default="builtin",
                        help="'builtin' (default) or a JSONL task file (any supported format)")
    parser.add_argument("--workers", type=int, default=2, help="gradings run at once")
    parser.add_argument("--json", help="write every result to this file")
    args = parser.parse_args()
    started = time.perf_counter()
    results = evaluate(resolve_tasks(args.tasks), read_completions(args.solutions), args.workers)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return summarize(results, time.perf_counter() - started)


if __name__ == "__main__":
    main()
