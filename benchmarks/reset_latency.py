"""Time to a fresh interpreter: ``env.reset()`` by the zygote versus a freshly spawned worker.

Each sample is a reset followed by the first step, so both designs end with a usable
interpreter: ``import numpy`` (already in memory in a zygote's worker) or ``pass``. All with
the default isolation layers, and the zygote's also without the namespace, uid and seccomp
layers (what they cost). The variants are sampled in turns.

These compare what starting an interpreter costs, so they run with ``start_ahead=False``.
Two more rows show the default, where the next episode's interpreter is started while the
current one runs: ``started ahead``, with the other variants' turns (tens of milliseconds,
as an agent writing its next program) before each reset, and ``started ahead, back to
back``, a reset that comes right after the one before, when that start is still under way.

    python benchmarks/reset_latency.py [--resets 50] [--spawn-resets 15]

Writes benchmarks/results/reset_latency.json and reset_latency.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks.common import machine, percentiles, plot_ecdf, print_rows, progress, write_json

_ONE = {"start_ahead": False}
#: Time for the zygote to fork and warm up a new spare (it rehearses a whole step).
SPARE_S = 0.02
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # name: (first step, CodingEnv options)
    "zygote, numpy": ("import numpy", _ONE),
    "spawn, numpy": ("import numpy", {**_ONE, "start_method": "spawn"}),
    "zygote, bare": ("pass", {**_ONE, "preload": []}),
    "spawn, bare": ("pass", {**_ONE, "start_method": "spawn"}),
    "zygote, numpy, no isolation": ("import numpy", {**_ONE, "isolation": {
        "network": False, "filesystem": False, "user": False, "seccomp": False}}),
    "zygote, numpy, started ahead": ("import numpy", {}),
    "zygote, numpy, started ahead, back to back": ("import numpy", {}),
}


def run(resets: int = 50, spawn_resets: int = 15) -> dict[str, Any]:
    """Resets of every variant in turns, so that the machine's load weighs on all alike."""
    from coding_gym.env import CodingEnv

    envs = {name: CodingEnv(**options) for name, (_, options) in VARIANTS.items()}
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    try:
        for name, env in envs.items():
            env.reset()  # starts the zygote, if any, outside the measurement
            env.step(VARIANTS[name][0])
        every = max(1, resets // spawn_resets)
        for i in progress(range(resets), "reset latency"):
            for name, env in envs.items():
                if name.startswith("spawn") and i % every:
                    continue
                first_step = VARIANTS[name][0]
                if name.endswith("back to back"):
                    env.reset()
                    env.step(first_step)
                start = time.perf_counter()
                env.reset()
                obs, *_ = env.step(first_step)
                samples[name].append(time.perf_counter() - start)
                assert obs["exit_code"] == 0, obs
                _settle(env)
    finally:
        for env in envs.values():
            env.close()
    results = {name: percentiles(values) for name, values in samples.items()}
    tasks = task_episodes()
    speedup = results["spawn, numpy"]["p50_us"] / results["zygote, numpy"]["p50_us"]
    plot = plot_ecdf("reset_latency", "reset + first step: zygote vs fresh worker", samples,
                     unit="ms", scale=1e3)
    return {
        "benchmark": "reset_latency",
        "machine": machine(),
        "results": results,
        "numpy_speedup": speedup,
        "bare_speedup": results["spawn, bare"]["p50_us"] / results["zygote, bare"]["p50_us"],
        "ahead_speedup": results["zygote, numpy"]["p50_us"]
        / results["zygote, numpy, started ahead"]["p50_us"],
        "task_episodes": tasks,
        "plot": plot.name,
        "targets": {"reset_with_numpy_at_least_20x_faster": speedup >= 20},
    }


def _settle(env: Any) -> None:
    """Wait for the interpreters ``env`` is starting ahead (its own, and its grader's), and
    for the zygote's spare that replaces the one each took, so that their start-up does not
    run beside the next variant's sample."""
    tasks = env.unwrapped._tasks
    backends = [env.unwrapped.backend] + ([tasks.grader.backend] if tasks is not None else [])
    ahead = [backend._next for backend in backends if getattr(backend, "_next", None)]
    for following in ahead:
        following._wait()
    if ahead:
        time.sleep(SPARE_S)


def task_episodes(episodes: int = 30, think_s: float = 0.02) -> dict[str, Any]:
    """A whole one-step episode of a task env: ``reset()``, then a step that submits the
    task's solution and is graded (the grader resets its own backend: a second interpreter
    per step), with and without interpreters started ahead, in turns, ``think_s`` before
    each call (an agent writing its program)."""
    from coding_gym.env import CodingEnv
    from coding_gym.tasks import load_builtin

    solutions = {task.task_id: task.solution for task in load_builtin()}
    envs = {"started ahead": CodingEnv(tasks="builtin"),
            "one interpreter": CodingEnv(tasks="builtin", start_ahead=False)}
    samples: dict[str, dict[str, list[float]]] = {
        name: {"reset": [], "graded step": []} for name in envs}
    try:
        for turn in progress(range(episodes + 2), "task episodes"):  # two turns warm up
            for name, env in envs.items():
                time.sleep(think_s)
                began = time.perf_counter()
                _, info = env.reset()
                reset = time.perf_counter() - began
                time.sleep(think_s)
                began = time.perf_counter()
                _, reward, terminated, *_ = env.step(solutions[info["task_id"]])
                step = time.perf_counter() - began
                assert terminated and reward == 1.0, info["task_id"]
                if turn >= 2:
                    samples[name]["reset"].append(reset)
                    samples[name]["graded step"].append(step)
                _settle(env)
    finally:
        for env in envs.values():
            env.close()
    return {name: {part: percentiles(values) for part, values in parts.items()}
            for name, parts in samples.items()}


def print_table(report: dict[str, Any]) -> None:
    print_rows(["reset + first step", "p50 ms", "p95 ms", "n"],
               [(name, row["p50_us"] / 1000, row["p95_us"] / 1000, row["n"])
                for name, row in report["results"].items()])
    print(f"zygote speed-up: {report['numpy_speedup']:.1f}x with numpy, "
          f"{report['bare_speedup']:.1f}x bare; started ahead: "
          f"{report['ahead_speedup']:.1f}x more")
    print()
    print_rows(["task episode, p50 ms", "reset", "graded step", "both"],
               [(name, parts["reset"]["p50_us"] / 1000, parts["graded step"]["p50_us"] / 1000,
                 (parts["reset"]["p50_us"] + parts["graded step"]["p50_us"]) / 1000)
                for name, parts in report["task_episodes"].items()])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="reset latency: zygote vs spawn")
    parser.add_argument("--resets", type=int, default=50)
    parser.add_argument("--spawn-resets", type=int, default=15)
    args = parser.parse_args(argv)
    report = run(args.resets, args.spawn_resets)
    print_table(report)
    print(f"\nwrote {write_json('reset_latency', report)}")
    return report


if __name__ == "__main__":
    main()
