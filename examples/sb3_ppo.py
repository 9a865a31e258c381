"""PPO (stable-baselines3) learns, from scratch, which program solves the prompted task.

Eight built-in tasks; the action picks one of eight snippets (their reference solutions) with
``SnippetActions``, and ``CodeFeatures`` turns the prompt into numbers. Each episode is one
pick, graded by the task's tests in a fresh sandbox, so a random policy earns 1/8 on average.
PPO sees only hashed words of the prompt and the reward.

    pip install "coding-gym[sb3]"
    python examples/sb3_ppo.py --timesteps 384 --out ppo_learning_curve.png

Prints a table of the learning curve, the greedy policy's result on every task, and a last
line of JSON with the numbers; saves the learning curve as a PNG.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import gymnasium as gym
import numpy as np

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.tasks import load_builtin
from coding_gym.wrappers import CodeFeatures, SnippetActions

TASK_IDS = [
    "builtin/sum_list", "builtin/reverse_string", "builtin/count_vowels",
    "builtin/max_of_list", "builtin/is_palindrome", "builtin/factorial",
    "builtin/caesar_shift", "builtin/count_set_bits",
]


def make_env() -> gym.Env[Any, Any]:
    """One episode = one task, one pick among the snippets."""
    by_id = {task.task_id: task for task in load_builtin()}
    tasks = [by_id[task_id] for task_id in TASK_IDS]
    snippets = [task.solution or "" for task in tasks]
    env = gym.make("CodingEnv-v0", tasks=tasks, max_episode_steps=1)
    return CodeFeatures(SnippetActions(env, snippets), buckets=64)


def main() -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--timesteps", type=int, default=384)
    parser.add_argument("--envs", type=int, default=2, help="environments stepped in parallel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="ppo_learning_curve.png", help="PNG of the curve")
    args = parser.parse_args()

    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import SubprocVecEnv

    # One thread: the network is tiny, and a single thread makes the run repeatable.
    torch.set_num_threads(1)
    started = time.perf_counter()
    # Processes, not threads: most of a step is starting and grading sandbox workers.
    vec_env = make_vec_env(make_env, n_envs=args.envs, seed=args.seed, vec_env_cls=SubprocVecEnv)
    curve: list[tuple[int, float]] = []

    class RolloutReward(BaseCallback):
        """Mean reward of each rollout: one point of the learning curve."""

        def _on_rollout_start(self) -> None:
            self.rewards: list[float] = []

        def _on_step(self) -> bool:
            self.rewards.extend(float(r) for r in self.locals["rewards"])
            return True

        def _on_rollout_end(self) -> None:
            curve.append((self.num_timesteps, float(np.mean(self.rewards))))

    model = PPO("MlpPolicy", vec_env, n_steps=32, batch_size=32, n_epochs=20,
                learning_rate=3e-3, policy_kwargs={"net_arch": [64]}, seed=args.seed, verbose=0)
    model.set_logger(Logger(folder=None, output_formats=[]))  # no log directory to leave behind
    try:
        model.learn(total_timesteps=args.timesteps, callback=RolloutReward())
    finally:
        vec_env.close()

    greedy = evaluate(model)
    random_reward = 1 / len(TASK_IDS)
    print(f"{'timesteps':>10}  mean reward")
    for steps, reward in curve:
        print(f"{steps:>10}  {reward:.3f}  {'#' * round(reward * 40)}")
    print(f"\n{'task':<28} greedy reward")
    for task_id, reward in greedy.items():
        print(f"{task_id:<28} {reward:.1f}")
    summary = {
        "timesteps": curve[-1][0] if curve else 0,
        "random_reward": random_reward,
        "first_rollout_reward": curve[0][1] if curve else None,
        "last_rollout_reward": curve[-1][1] if curve else None,
        "greedy_mean_reward": float(np.mean(list(greedy.values()))),
        "seconds": round(time.perf_counter() - started, 1),
        "plot": plot(curve, random_reward, args.out),
    }
    print(json.dumps(summary))
    return summary


def evaluate(model: Any) -> dict[str, float]:
    """The greedy policy's reward on each task, chosen through reset options."""
    env = make_env()
    try:
        rewards = {}
        for i, task_id in enumerate(TASK_IDS):
            observation, _ = env.reset(seed=i, options={"task_id": task_id})
            action, _ = model.predict(observation, deterministic=True)
            rewards[task_id] = float(env.step(action)[1])
        return rewards
    finally:
        env.close()


def plot(curve: list[tuple[int, float]], random_reward: float, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot([s for s, _ in curve], [r for _, r in curve], marker="o", label="PPO")
    axes.axhline(random_reward, color="grey", linestyle="--", label="random policy")
    axes.set(xlabel="timesteps", ylabel="mean reward per rollout", ylim=(0, 1.05),
             title="PPO picks the snippet that solves the prompted task")
    axes.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
