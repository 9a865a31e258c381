"""Roll out built-in tasks on eight environments at once, then tabulate pass rates.

The table has, per task: episodes, the share solved at the first attempt, the share solved,
and the mean reward of the first attempt (the fraction of tests it passed).

A scripted agent stands in for a model: its first attempt at a task is, at random, the
reference solution, a stub that defines nothing, or another task's solution; if that fails,
its second attempt is the reference solution, which ends the episode. Works with whichever
vector env ``gymnasium.make_vec`` returns (either autoreset convention).

    python examples/vector_rollouts.py --episodes 64

Shows a progress bar (tqdm when installed, text otherwise), then one row per task and a
last line of JSON with the totals.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.tasks import load_builtin


class ScriptedAgent:
    """First attempt: right, empty or another task's program; second: the right one."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.solutions = {task.task_id: task.solution or "" for task in load_builtin()}
        self.task_ids = sorted(self.solutions)

    def act(self, task_id: str, attempt: int) -> str:
        if attempt > 0:
            return self.solutions[task_id]
        choice = self.rng.integers(3)
        if choice == 0:
            return self.solutions[task_id]
        if choice == 1:
            return "pass"
        other = self.task_ids[int(self.rng.integers(len(self.task_ids)))]
        return self.solutions[other]


class Progress:
    """tqdm when it is installed, else a text bar on stderr."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, unit="episode", file=sys.stderr)

    def update(self, solved: int) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(solved=solved)
            return
        filled = round(30 * self.done / self.total)
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                         f"episodes, {solved} solved")
        sys.stderr.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


def rollout(episodes: int, num_envs: int, seed: int) -> dict[str, list[dict[str, Any]]]:
    """Run ``episodes`` episodes; per task, one record per episode."""
    envs = gym.make_vec("CodingEnv-v0", num_envs=num_envs, tasks="builtin",
                        vectorization_mode="sync")
    mode = AutoresetMode(envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP))
    if mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
        raise RuntimeError(f"this example handles next-step and same-step autoreset, not {mode}")
    agent = ScriptedAgent(seed)
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    progress = Progress(episodes)
    finished = solved = 0
    try:
        _, infos = envs.reset(seed=seed)
        task_ids = list(infos["task_id"])
        attempts = [0] * num_envs
        first_rewards = [0.0] * num_envs
        resetting = [False] * num_envs  # next-step autoreset: this env's next step resets it
        while finished < episodes:
            actions = tuple("" if resetting[i] else agent.act(task_ids[i], attempts[i])
                            for i in range(num_envs))
            _, rewards, terminated, truncated, infos = envs.step(actions)
            for i in range(num_envs):
                if resetting[i]:
                    resetting[i] = False
                    task_ids[i] = infos["task_id"][i]
                    continue
                attempts[i] += 1
                if attempts[i] == 1:
                    first_rewards[i] = float(rewards[i])
                if not (terminated[i] or truncated[i]):
                    continue
                if finished < episodes:
                    finished += 1
                    solved += bool(terminated[i])
                    results[task_ids[i]].append({"attempts": attempts[i],
                                                 "solved": bool(terminated[i]),
                                                 "first_reward": first_rewards[i]})
                    progress.update(solved)
                attempts[i] = 0
                if mode is AutoresetMode.NEXT_STEP:
                    resetting[i] = True
                else:
                    task_ids[i] = infos["task_id"][i]
    finally:
        progress.close()
        envs.close()
    return results


def report(results: dict[str, list[dict[str, Any]]], seconds: float) -> dict[str, Any]:
    print(f"{'task':<32} {'episodes':>8} {'1st try':>8} {'solved':>8} {'1st reward':>10}")
    rows = [r for task_id in sorted(results) for r in results[task_id]]
    for task_id in sorted(results):
        episodes = results[task_id]
        first = np.mean([e["solved"] and e["attempts"] == 1 for e in episodes])
        solved = np.mean([e["solved"] for e in episodes])
        first_reward = np.mean([e["first_reward"] for e in episodes])
        print(f"{task_id:<32} {len(episodes):>8} {first:>8.0%} {solved:>8.0%} "
              f"{first_reward:>10.2f}")
    totals = {
        "episodes": len(rows),
        "tasks": len(results),
        "first_try_pass_rate": float(np.mean([r["solved"] and r["attempts"] == 1 for r in rows])),
        "pass_rate": float(np.mean([r["solved"] for r in rows])),
        "steps": int(sum(r["attempts"] for r in rows)),
        "seconds": round(seconds, 1),
    }
    print(f"{'all':<32} {totals['episodes']:>8} {totals['first_try_pass_rate']:>8.0%} "
          f"{totals['pass_rate']:>8.0%}")
    print(json.dumps(totals))
    return totals


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--num-envs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    results = rollout(args.episodes, args.num_envs, args.seed)
    return report(results, time.perf_counter() - started)


if __name__ == "__main__":
    main()
