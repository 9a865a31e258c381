"""Latency of ``env.step("print(1)")`` beside its floors and the naive design.

Side by side in one run, sampled in turns so the machine's load weighs on all alike:
- in-process ``exec`` with stdout redirected (the floor: no isolation at all);
- a raw pipe round trip to a minimal echo child (the floor of any worker process design);
- a ping of the env's own worker over its socket, the worker placed as a step places it
  (the round trip ``env.step`` builds on);
- a raw worker: the smallest process that runs code and returns its output;
- ``CodingEnv.step`` on the local backend (full isolation, fd-level capture, limits);
- a fresh ``sys.executable -c`` per step (the naive design; fewer samples, it is slow).

    python benchmarks/step_latency.py [--steps 2000] [--spawn-steps 50]

Prints a table and writes benchmarks/results/step_latency.json and step_latency.png.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import select
import socket
import subprocess
import sys
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RawWorker,
    interleaved,
    machine,
    percentiles,
    plot_ecdf,
    print_rows,
    progress,
    write_json,
)
from coding_gym.sandbox import protocol

CODE = "print(1)"

_ECHO_CHILD = """\
import os, sys
fd = int(sys.argv[1])
while True:
    data = os.read(fd, 65536)
    if not data:
        break
    os.write(fd, data)
"""


def run(steps: int = 2000, spawn_steps: int = 50) -> dict[str, Any]:
    from coding_gym.env import CodingEnv

    namespace: dict[str, object] = {}

    def in_process_exec() -> None:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(CODE, "<cell>", "exec"), namespace)
        buffer.getvalue()

    parent, child = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", _ECHO_CHILD, str(child.fileno())],
                            pass_fds=(child.fileno(),))
    child.close()
    message = b'{"cmd":"run","code":"print(1)","timeout_s":10.0}'

    def raw_pipe_round_trip() -> None:
        parent.sendall(message)
        parent.recv(65536)

    raw = RawWorker()
    env = CodingEnv()
    env.reset(seed=0)
    worker = env.backend._episode.worker  # type: ignore[attr-defined]
    ping = protocol.encode({"cmd": "ping"})

    def worker_ping() -> None:
        worker.place(follow=True)  # where env.step has the worker wait (sandbox/affinity.py)
        worker.sock.send(ping)
        select.select([worker.sock], [], [])
        worker.sock.recv(65536)

    try:
        samples = interleaved({
            "in_process_exec": in_process_exec,
            "raw_pipe_round_trip": raw_pipe_round_trip,
            "worker_ping": worker_ping,
            "raw_exec_worker": lambda: raw.run(CODE),
            "env_step": lambda: env.step(CODE),
        }, steps, "step latency")
    finally:
        env.close()
        raw.close()
        parent.close()
        echo.wait()
    spawn = []
    perf_counter = __import__("time").perf_counter
    for _ in progress(range(spawn_steps), "fresh interpreter per step"):
        start = perf_counter()
        subprocess.run([sys.executable, "-c", CODE], capture_output=True, check=True)
        spawn.append(perf_counter() - start)
    samples["fresh_spawn_per_step"] = spawn
    results = {name: percentiles(values) for name, values in samples.items()}
    for row in results.values():
        row["p50_vs_raw_pipe"] = row["p50_us"] / results["raw_pipe_round_trip"]["p50_us"]
        row["p50_vs_worker_ping"] = row["p50_us"] / results["worker_ping"]["p50_us"]
    plot = plot_ecdf("step_latency", 'env.step("print(1)") beside its floors', samples)
    return {
        "benchmark": "step_latency",
        "code": CODE,
        "machine": machine(),
        "results": results,
        "plot": plot.name,
        "targets": {"env_step_p50_at_most_2.5x_worker_ping":
                    results["env_step"]["p50_vs_worker_ping"] <= 2.5},
    }


def print_table(report: dict[str, Any]) -> None:
    print_rows(["design", "p50 µs", "p95 µs", "n", "p50 / echo", "p50 / ping"],
               [(name, row["p50_us"], row["p95_us"], row["n"], f"{row['p50_vs_raw_pipe']:.2f}x",
                 f"{row['p50_vs_worker_ping']:.2f}x")
                for name, row in report["results"].items()])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="env.step latency beside its floors")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--spawn-steps", type=int, default=50)
    args = parser.parse_args(argv)
    report = run(args.steps, args.spawn_steps)
    print_table(report)
    print(f"\nwrote {write_json('step_latency', report)}")
    return report


if __name__ == "__main__":
    main()
