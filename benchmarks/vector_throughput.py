"""Steps per second of N envs stepped together, for N = 1, 2, 4, 8, 16, ``print(1)`` each.

- ``native``: :class:`coding_gym.vector.CodingVectorEnv` (``gymnasium.make_vec``): one poll loop
  over the N workers;
- ``async``: ``gymnasium.vector.AsyncVectorEnv(shared_memory=False)`` over the same envs: a
  process per env between this process and its worker;
- ``sync``: ``gymnasium.vector.SyncVectorEnv``: the envs one after the other;
- ``raw ceiling``: N minimal workers (exec with in-memory capture, nothing else) driven by one
  poll loop: what the machine allows for N processes answering N messages.

Then ``native`` and ``async`` again for 8 envs beside busy programs (``LOADS``): one
idle-priority process, one at nice 19, and one normal process per CPU, each a Python loop.

    python benchmarks/vector_throughput.py [--seconds 3] [--max-envs 16]

Writes benchmarks/results/vector_throughput.json and vector_throughput.png.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks.common import RawWorker, figure, machine, print_rows, progress, save, write_json

CODE = "print(1)"
DESIGNS = ("native", "async", "sync", "raw ceiling")
#: Busy programs beside which the vector envs are measured again: (what each does first to
#: its scheduling, how many, as a count or "per CPU").
LOADS: dict[str, tuple[str, int | str]] = {
    "one idle-priority busy process": ("os.sched_setscheduler(0, os.SCHED_IDLE, "
                                       "os.sched_param(0))", 1),
    "one nice-19 busy process": ("os.nice(19)", 1),
    "a normal busy process per CPU": ("pass", "per CPU"),
}


def _steps_per_second(step: Callable[[], object], num_envs: int, seconds: float) -> float:
    steps = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        step()
        steps += 1
        now = time.perf_counter()
        if now >= deadline:
            return steps * num_envs / (now - start)


def _gymnasium(design: str, num_envs: int) -> tuple[Callable[[], object], Callable[[], None]]:
    """(one step of all envs, close) for a Gymnasium vector env of ``design``."""
    import gymnasium as gym

    from coding_gym.env import CodingEnv
    from coding_gym.vector import CodingVectorEnv

    envs: Any
    if design == "native":
        envs = CodingVectorEnv(num_envs)
    elif design == "async":
        envs = gym.vector.AsyncVectorEnv([CodingEnv] * num_envs, shared_memory=False)
    else:
        envs = gym.vector.SyncVectorEnv([CodingEnv] * num_envs)
    actions = (CODE,) * num_envs
    envs.reset(seed=0)
    return (lambda: envs.step(actions)), envs.close


def _raw_ceiling(num_envs: int) -> tuple[Callable[[], object], Callable[[], None]]:
    """(one step of all workers, close) for N raw workers driven by one poll loop."""
    workers = [RawWorker() for _ in range(num_envs)]
    by_fd = {worker.sock.fileno(): worker for worker in workers}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)

    def step() -> None:
        for worker in workers:
            worker.send(CODE)
        waiting = len(workers)
        while waiting:
            for fd, _ in poller.poll():
                worker = by_fd[fd]
                if worker.feed(worker.sock.recv(65536)) is not None:
                    waiting -= 1

    def close() -> None:
        for worker in workers:
            worker.close()

    return step, close


def _in_turns(started: dict[str, tuple[Callable[[], object], Callable[[], None]]],
              num_envs: int, seconds: float, rounds: int) -> dict[str, float]:
    """Each design's steps per second: the median of ``rounds`` samples of ``seconds /
    rounds`` taken in turns, after one of warm-up."""
    for step, _ in started.values():
        _steps_per_second(step, num_envs, seconds / rounds)  # warm-up
    rates: dict[str, list[float]] = {design: [] for design in started}
    for _ in range(rounds):
        for design, (step, _) in started.items():
            rates[design].append(_steps_per_second(step, num_envs, seconds / rounds))
    return {design: statistics.median(samples) for design, samples in rates.items()}


@contextmanager
def busy(setup: str, count: int | str) -> Iterator[None]:
    """``count`` processes (or one per CPU) looping in Python after ``setup``, while inside."""
    number = len(os.sched_getaffinity(0)) if count == "per CPU" else int(count)
    loops = [subprocess.Popen([sys.executable, "-c", f"import os\n{setup}\nwhile True: pass"])
             for _ in range(number)]
    try:
        time.sleep(0.2)  # started, and looping
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def under_load(seconds: float, rounds: int, num_envs: int = 8) -> dict[str, dict[str, float]]:
    """Steps per second of ``native`` and ``async`` beside each of :data:`LOADS` (the
    median of ``rounds`` in turns)."""
    started = {design: _gymnasium(design, num_envs) for design in ("native", "async")}
    table: dict[str, dict[str, float]] = {}
    try:
        for name, (setup, count) in progress(LOADS.items(), "vector throughput under load"):
            with busy(setup, count):
                table[name] = _in_turns(started, num_envs, seconds, rounds)
    finally:
        for _, close in started.values():
            close()
    return table


def run(seconds: float = 3.0, max_envs: int = 16, rounds: int = 5) -> dict[str, Any]:
    """``seconds`` per design and size, split into ``rounds`` taken in turns (the median
    counts), so that the machine's load and process placement weigh on all designs alike."""
    sizes = [n for n in (1, 2, 4, 8, 16) if n <= max_envs]
    table: dict[str, dict[int, float]] = {design: {} for design in DESIGNS}
    for n in progress(sizes, "vector throughput"):
        started = {design: _raw_ceiling(n) if design == "raw ceiling" else _gymnasium(design, n)
                   for design in DESIGNS}
        try:
            rates = _in_turns(started, n, seconds, rounds)
        finally:
            for _, close in started.values():
                close()
        for design in DESIGNS:
            table[design][n] = rates[design]
    reference = 8 if 8 in sizes else sizes[-1]
    native = table["native"][reference]
    ratios = {
        "envs": reference,
        "native_vs_raw_ceiling": native / table["raw ceiling"][reference],
        "native_vs_async": native / table["async"][reference],
        "native_vs_sync": native / table["sync"][reference],
    }
    fig, axes = figure()
    for design in DESIGNS:
        axes.plot(sizes, [table[design][n] for n in sizes], marker="o", label=design)
    axes.set_xscale("log", base=2)
    axes.set_xticks(sizes, [str(n) for n in sizes])
    axes.set_xlabel("number of envs")
    axes.set_ylabel("steps per second (all envs)")
    axes.set_title(f'Throughput of print(1) on {machine()["cpus"]} CPUs')
    axes.legend()
    plot = save(fig, "vector_throughput")
    loaded = under_load(seconds, rounds, reference)
    return {
        "benchmark": "vector_throughput",
        "code": CODE,
        "machine": machine(),
        "seconds_per_case": seconds,
        "rounds": rounds,
        "steps_per_second": {design: {str(n): v for n, v in rows.items()}
                             for design, rows in table.items()},
        "ratios": ratios,
        "under_load": {"envs": reference, "steps_per_second": loaded},
        "plot": plot.name,
        "targets": {
            f"native_{reference}_envs_at_least_80pct_of_raw":
                ratios["native_vs_raw_ceiling"] >= 0.8,
            f"native_{reference}_envs_at_least_3x_async": ratios["native_vs_async"] >= 3.0,
        },
    }


def print_table(report: dict[str, Any]) -> None:
    rows = report["steps_per_second"]
    sizes = list(rows["native"])
    print_rows(["envs", *DESIGNS], [(n, *(rows[d][n] for d in DESIGNS)) for n in sizes])
    r = report["ratios"]
    print(f"{r['envs']} envs: native = {r['native_vs_raw_ceiling']:.0%} of the raw ceiling, "
          f"{r['native_vs_async']:.1f}x async, {r['native_vs_sync']:.1f}x sync")
    loaded = report["under_load"]
    print(f"\n{loaded['envs']} envs beside busy programs (steps/s):")
    print_rows(["beside", "native", "async"],
               [(name, rates["native"], rates["async"])
                for name, rates in loaded["steps_per_second"].items()])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="vector env throughput")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each case")
    parser.add_argument("--max-envs", type=int, default=16)
    args = parser.parse_args(argv)
    report = run(args.seconds, args.max_envs)
    print_table(report)
    print(f"\nwrote {write_json('vector_throughput', report)}")
    return report


if __name__ == "__main__":
    main()
