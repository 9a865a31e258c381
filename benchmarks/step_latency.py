"""Latency of ``env.step("print(1)")`` beside its floors and the naive design.

Side by side in one run:
- in-process ``exec`` with stdout redirected (the floor: no isolation at all);
- a raw pipe round trip to a minimal echo child (the floor of any worker process design);
- ``CodingEnv.step`` on the local backend;
- a fresh ``sys.executable -c`` per step (the naive design; fewer samples, it is slow).

    python benchmarks/step_latency.py [--steps 2000] [--spawn-steps 50]

Prints a table and writes benchmarks/results/step_latency.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CODE = "print(1)"
RESULTS = Path(__file__).parent / "results"

_ECHO_CHILD = """\
import os, sys
fd = int(sys.argv[1])
while True:
    data = os.read(fd, 65536)
    if not data:
        break
    os.write(fd, data)
"""


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p95_us": ordered[int(len(ordered) * 0.95)] * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
        "n": len(ordered),
    }


def in_process_exec(steps: int) -> list[float]:
    compiled_namespace: dict[str, object] = {}
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(CODE, "<cell>", "exec"), compiled_namespace)
        buffer.getvalue()
        samples.append(time.perf_counter() - start)
    return samples


def raw_pipe_round_trip(steps: int) -> list[float]:
    parent, child = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-c", _ECHO_CHILD, str(child.fileno())],
                            pass_fds=(child.fileno(),))
    child.close()
    message = json.dumps({"cmd": "run", "code": CODE}).encode()
    samples = []
    try:
        for _ in range(steps):
            start = time.perf_counter()
            parent.sendall(message)
            parent.recv(65536)
            samples.append(time.perf_counter() - start)
    finally:
        parent.close()
        proc.wait()
    return samples


def env_step(steps: int) -> list[float]:
    from coding_gym.env import CodingEnv

    samples = []
    with CodingEnv() as env:
        env.reset(seed=0)
        for _ in range(100):  # warm-up
            env.step(CODE)
        for _ in range(steps):
            start = time.perf_counter()
            env.step(CODE)
            samples.append(time.perf_counter() - start)
    return samples


def fresh_spawn(steps: int) -> list[float]:
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", CODE], capture_output=True, check=True)
        samples.append(time.perf_counter() - start)
    return samples


def run(steps: int = 2000, spawn_steps: int = 50) -> dict[str, object]:
    results = {
        "in_process_exec": _percentiles(in_process_exec(steps)),
        "raw_pipe_round_trip": _percentiles(raw_pipe_round_trip(steps)),
        "env_step": _percentiles(env_step(steps)),
        "fresh_spawn_per_step": _percentiles(fresh_spawn(spawn_steps)),
    }
    floor = results["raw_pipe_round_trip"]["p50_us"]  # type: ignore[index]
    for row in results.values():
        row["p50_vs_raw_pipe"] = row["p50_us"] / floor  # type: ignore[index]
    return {
        "benchmark": "step_latency",
        "code": CODE,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "results": results,
    }


def print_table(report: dict[str, object]) -> None:
    rows = report["results"]
    print(f"{'design':<24}{'p50 µs':>10}{'p95 µs':>10}{'n':>7}{'p50 / raw pipe':>16}")
    for name, row in rows.items():  # type: ignore[attr-defined]
        print(f"{name:<24}{row['p50_us']:>10.1f}{row['p95_us']:>10.1f}{row['n']:>7}"
              f"{row['p50_vs_raw_pipe']:>15.2f}x")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description="env.step latency beside its floors")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--spawn-steps", type=int, default=50)
    args = parser.parse_args(argv)
    report = run(args.steps, args.spawn_steps)
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "step_latency.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
