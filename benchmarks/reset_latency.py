"""Time to a fresh interpreter: ``env.reset()`` by the zygote versus a freshly spawned worker.

Each sample is a reset followed by the first step, so both designs end with a usable
interpreter: ``import numpy`` (already in memory in a zygote's worker) or ``pass``. All with
the default isolation layers, then the zygote's without them (what isolation costs).

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


def _resets(samples: int, first_step: str, desc: str, **options: Any) -> list[float]:
    from coding_gym.env import CodingEnv

    timings = []
    with CodingEnv(**options) as env:
        env.reset()  # starts the zygote, if any, outside the measurement
        env.step(first_step)
        for _ in progress(range(samples), desc):
            start = time.perf_counter()
            env.reset()
            obs, *_ = env.step(first_step)
            timings.append(time.perf_counter() - start)
            assert obs["exit_code"] == 0, obs
    return timings


def run(resets: int = 50, spawn_resets: int = 15) -> dict[str, Any]:
    samples = {
        "zygote, numpy": _resets(resets, "import numpy", "reset: zygote, numpy"),
        "spawn, numpy": _resets(spawn_resets, "import numpy", "reset: spawn, numpy",
                                start_method="spawn"),
        "zygote, bare": _resets(resets, "pass", "reset: zygote, bare", preload=[]),
        "spawn, bare": _resets(spawn_resets, "pass", "reset: spawn, bare", start_method="spawn"),
        "zygote, numpy, no isolation": _resets(resets, "import numpy",
                                               "reset: zygote, no isolation",
                                               isolation={"network": False, "filesystem": False,
                                                          "user": False, "seccomp": False}),
    }
    results = {name: percentiles(values) for name, values in samples.items()}
    speedup = results["spawn, numpy"]["p50_us"] / results["zygote, numpy"]["p50_us"]
    plot = plot_ecdf("reset_latency", "reset + first step: zygote vs fresh worker", samples,
                     unit="ms", scale=1e3)
    return {
        "benchmark": "reset_latency",
        "machine": machine(),
        "results": results,
        "numpy_speedup": speedup,
        "bare_speedup": results["spawn, bare"]["p50_us"] / results["zygote, bare"]["p50_us"],
        "plot": plot.name,
        "targets": {"reset_with_numpy_at_least_20x_faster": speedup >= 20},
    }


def print_table(report: dict[str, Any]) -> None:
    print_rows(["reset + first step", "p50 ms", "p95 ms", "n"],
               [(name, row["p50_us"] / 1000, row["p95_us"] / 1000, row["n"])
                for name, row in report["results"].items()])
    print(f"zygote speed-up: {report['numpy_speedup']:.1f}x with numpy, "
          f"{report['bare_speedup']:.1f}x bare")


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
