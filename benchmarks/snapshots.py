"""Cost of ``snapshot()``, ``restore()``, ``fork()`` and transactional steps.

Measured on ``CodingEnv`` with a small interpreter (a few variables), forked from a bare zygote
and from one that preloads NumPy (bigger page tables to copy at each fork).

    python benchmarks/snapshots.py [--samples 100]

Writes benchmarks/results/snapshots.json and snapshots.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks.common import figure, machine, percentiles, print_rows, progress, save, write_json

STATE = "import collections\nx = list(range(1000))\ncounts = collections.Counter('abcab')"
OPERATIONS = ("snapshot", "restore", "snapshot + restore", "snapshot + restore after a step",
              "fork", "step", "transactional step")


def _measure(preload: list[str] | None, samples: int, desc: str) -> dict[str, list[float]]:
    from coding_gym.env import CodingEnv

    timings: dict[str, list[float]] = {name: [] for name in OPERATIONS}
    clock = time.perf_counter
    with CodingEnv(preload=preload) as env, \
            CodingEnv(preload=preload, transactional=True) as transactional:
        for e in (env, transactional):
            e.reset(seed=0)
            e.step(STATE)
        kept = env.snapshot()
        for _ in progress(range(samples), desc):
            start = clock()
            snapshot = env.snapshot()
            timings["snapshot"].append(clock() - start)
            snapshot.release()
            start = clock()
            env.restore(kept)
            timings["restore"].append(clock() - start)
            start = clock()
            snapshot = env.snapshot()
            env.restore(snapshot)
            timings["snapshot + restore"].append(clock() - start)
            snapshot.release()
            start = clock()
            fork = env.fork()
            timings["fork"].append(clock() - start)
            fork.close()
            for name, e in (("step", env), ("transactional step", transactional)):
                start = clock()
                e.step("x.append(1)")
                timings[name].append(clock() - start)
            # As in a tree search (restore a node, step, snapshot the child): "snapshot +
            # restore" above comes right after a restore, whose worker may still be forking
            # the successor that keeps the restored snapshot reusable.
            start = clock()
            snapshot = env.snapshot()
            env.restore(snapshot)
            timings["snapshot + restore after a step"].append(clock() - start)
            snapshot.release()
            env.step("pass")  # the next snapshot, too, comes after a step
        assert env.step("print(len(x), counts['a'])")[0]["stdout"] == "1001 2\n"
        kept.release()
    return timings


def run(samples: int = 100) -> dict[str, Any]:
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, preload in (("bare", []), ("numpy", None)):
        timings = _measure(preload, samples, f"snapshots: {label} interpreter")
        results[label] = {name: percentiles(values) for name, values in timings.items()}
    fig, axes = figure(9.5, 4.8)
    width = 0.38
    positions = range(len(OPERATIONS))
    for offset, label in ((-width / 2, "bare"), (width / 2, "numpy")):
        p50 = [results[label][op]["p50_us"] / 1000 for op in OPERATIONS]
        p95 = [results[label][op]["p95_us"] / 1000 for op in OPERATIONS]
        axes.bar([p + offset for p in positions], p50, width, label=f"{label} (p50)",
                 yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p95, strict=True)]],
                 capsize=3)
    axes.set_xticks(list(positions), OPERATIONS, rotation=20, ha="right")
    axes.set_ylabel("milliseconds (bar: p50, whisker: p95)")
    axes.set_title("Snapshots of a small interpreter")
    axes.legend()
    plot = save(fig, "snapshots")
    pair_ms = results["bare"]["snapshot + restore"]["p50_us"] / 1000
    return {
        "benchmark": "snapshots",
        "machine": machine(),
        "state": STATE,
        "results": results,
        "plot": plot.name,
        "targets": {"snapshot_plus_restore_small_at_most_5ms": pair_ms <= 5.0},
    }


def print_table(report: dict[str, Any]) -> None:
    rows = []
    for label, table in report["results"].items():
        for name, row in table.items():
            rows.append((f"{name} ({label})", row["p50_us"] / 1000, row["p95_us"] / 1000))
    print_rows(["operation", "p50 ms", "p95 ms"], rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="snapshot, restore and fork costs")
    parser.add_argument("--samples", type=int, default=100)
    args = parser.parse_args(argv)
    report = run(args.samples)
    print_table(report)
    print(f"\nwrote {write_json('snapshots', report)}")
    return report


if __name__ == "__main__":
    main()
