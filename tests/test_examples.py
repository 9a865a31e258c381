"""The examples run end to end, as a user would run them, and report sensible numbers."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import pytest
from gymnasium.vector import AutoresetMode

from coding_gym.tasks import load_builtin

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _run(script: str, *args: str, timeout_s: float = 240) -> tuple[dict, str]:
    """Run an example; return the JSON summary on its last line, and all of stdout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stdout


def test_vector_rollouts():
    totals, stdout = _run("vector_rollouts.py", "--episodes", "24")
    assert totals["episodes"] == 24 and totals["pass_rate"] == 1.0
    # The scripted agent is right at its first attempt about a third of the time.
    assert 0.0 < totals["first_try_pass_rate"] < 1.0
    assert stdout.startswith("task ") and "\nall " in stdout


def _load_example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vector_rollouts_with_same_step_autoreset(monkeypatch, capsys):
    module = _load_example("vector_rollouts")
    make_vec = gym.make_vec

    def same_step(*args, **kwargs):
        return make_vec(*args, vector_kwargs={"autoreset_mode": AutoresetMode.SAME_STEP},
                        **kwargs)

    monkeypatch.setattr(module.gym, "make_vec", same_step)
    results = module.rollout(episodes=10, num_envs=4, seed=1)
    episodes = [e for task_episodes in results.values() for e in task_episodes]
    assert len(episodes) == 10 and all(e["solved"] and e["attempts"] <= 2 for e in episodes)
    assert set(results) <= {task.task_id for task in load_builtin()}


@pytest.mark.slow
def test_sb3_ppo_learns_above_random(tmp_path):
    # Fixed seeds and one torch thread make the run repeatable: the same snippet choices,
    # the same rewards. Random picking solves 1/8 of the tasks; the threshold asks the greedy
    # policy to solve at least half of them. Across ten other seeds the same configuration
    # ended between 0.5 and 1.0, so the margin covers numeric drift between library versions.
    out = tmp_path / "curve.png"
    summary, stdout = _run("sb3_ppo.py", "--timesteps", "384", "--out", str(out), timeout_s=600)
    assert summary["random_reward"] == 0.125
    assert summary["greedy_mean_reward"] >= 0.5, stdout
    assert summary["last_rollout_reward"] > summary["first_rollout_reward"]
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_solutions_on_the_builtin_suite(tmp_path):
    tasks = {task.task_id: task for task in load_builtin()}
    rows = [
        {"task_id": "builtin/sum_list", "completion": tasks["builtin/sum_list"].solution},
        {"task_id": "builtin/sum_list", "completion": "def sum_list(nums):\n    return 0\n"},
        {"task_id": "builtin/roman_numerals", "completion": ""},
        {"task_id": "builtin/factorial", "completion": tasks["builtin/factorial"].solution},
    ]
    solutions = tmp_path / "solutions.jsonl"
    solutions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    report = tmp_path / "report.json"
    totals, stdout = _run("evaluate_solutions.py", str(solutions), "--json", str(report))
    assert (totals["tasks"], totals["samples"], totals["pass_at_1"]) == (3, 4, 0.5)
    results = json.loads(report.read_text())
    assert [r["all_passed"] for r in results] == [True, False, False, True]
    assert results[1]["failures"][0].startswith("wrong answer: returned 0")
    assert "builtin/roman_numerals" in stdout


def test_evaluate_solutions_on_a_humaneval_file(tmp_path):
    task = {
        "task_id": "Fixture/clamp",
        "prompt": "def clamp(x: int, low: int, high: int) -> int:\n"
                  '    """Return x limited to the range [low, high]."""\n',
        "entry_point": "clamp",
        "canonical_solution": "    return max(low, min(x, high))\n",
        "test": "def check(candidate):\n"
                "    assert candidate(5, 0, 3) == 3\n"
                "    assert candidate(-1, 0, 3) == 0\n"
                "    assert candidate(2, 0, 3) == 2\n",
    }
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps(task) + "\n", encoding="utf-8")
    rows = [
        {"task_id": "Fixture/clamp", "completion": "    return max(low, min(x, high))\n"},
        {"task_id": "Fixture/clamp", "completion": "def clamp(x, low, high):\n    return x\n"},
    ]
    solutions = tmp_path / "samples.jsonl"
    solutions.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    totals, _ = _run("evaluate_solutions.py", str(solutions), "--tasks", str(tasks))
    assert totals["pass_at_1"] == 0.5
    assert totals["mean_test_fraction"] == pytest.approx((1 + 1 / 3) / 2)
