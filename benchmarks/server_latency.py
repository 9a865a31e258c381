"""Latency and throughput of the server beside the LocalBackend it wraps, in one run.

- ``LocalBackend.run("print(1)")`` in this process: the floor;
- the same step through ``RemoteBackend`` (``/ws``), through an HTTP session
  (``POST /step`` with ``X-Session-Id``), and stateless ``POST /step`` (OpenEnv's HTTP
  semantics: a fresh interpreter per request, so it pays a worker start every time);
- for context, the WebSocket step with the client, the server and its worker held to one
  CPU (on a machine with more than one): what the step costs when no wake-up crosses to
  another CPU, which a server cannot arrange for its clients;
- the start of an episode, each sample 20 ms after the last (a client does something between
  episodes): ``LocalBackend.reset()``, a reset over ``/ws``, and a stateless ``POST /step``
  (its episode's start, step and end); the server starts interpreters ahead in such pauses;
- aggregate steps/s with 1, 8, 32 and 64 WebSocket sessions stepping at once;
- with ``--docker-image``: the same server in a container from that image, reached through
  ``DockerBackend``, and the start-to-healthy time of a container beside a host process.

The server runs as ``coding-gym serve`` in a child process on loopback, so that client and
server do not share a GIL. Targets (ratios within one run): WS p50 at most 3x the
LocalBackend p50; 64 sessions without a single error; in Docker, step p50 and
start-to-healthy at most 2x the same server on the host.

    python benchmarks/server_latency.py [--steps 500] [--seconds 3] [--docker-image IMAGE]

Prints a table and writes benchmarks/results/server_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
from websockets.asyncio.client import connect

from coding_gym.backends.local import LocalBackend
from coding_gym.backends.remote import RemoteBackend

CODE = "print(1)"
RESULTS = Path(__file__).parent / "results"
CONCURRENCY = (1, 8, 32, 64)
WARM_UP = 50
#: Pause before each sample of an episode's start (see episode_starts).
THINK_S = 0.02
#: Order of the latency rows (table, JSON, plot): the one-CPU step after the WebSocket step
#: it is the context of.
LATENCY_ROWS = ("local_backend", "websocket", "websocket_one_cpu", "http_session",
                "http_stateless")


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p95_us": ordered[int(len(ordered) * 0.95)] * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
        "n": len(ordered),
    }


def _percentiles_ms(samples: list[float]) -> dict[str, float]:
    """:func:`_percentiles` in milliseconds, without the count."""
    return {k.replace("_us", "_ms"): v / 1000 for k, v in _percentiles(samples).items()
            if k != "n"}


def _timed(step: Callable[[], object], steps: int, warm_up: int = WARM_UP) -> list[float]:
    for _ in range(warm_up):
        step()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        samples.append(time.perf_counter() - start)
    return samples


@contextmanager
def serving(max_sessions: int, cpu: int | None = None) -> Iterator[str]:
    """``coding-gym serve`` on a free loopback port, held to ``cpu`` if given (its zygote and
    workers too); yields its URL.

    What it prints after its URL (a line per HTTP request) is read and dropped as it comes:
    left in the pipe, it would fill it after a few hundred requests, and the server would
    stop in the middle of writing a line."""
    process = subprocess.Popen(
        [sys.executable, "-m", "coding_gym.cli", "serve", "--port", "0",
         "--max-sessions", str(max_sessions)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if cpu is not None:
        # Python is still starting up: every thread and child it starts inherits the mask.
        os.sched_setaffinity(process.pid, (cpu,))
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        if " on http://" not in line:
            raise RuntimeError(f"the server did not start: {line!r}")
        threading.Thread(target=_drop_lines, args=(process.stdout,), daemon=True).start()
        yield line.split(" on ", 1)[1].strip()
    finally:
        process.terminate()
        process.wait(30)


def _drop_lines(stream: IO[str]) -> None:
    for _ in stream:
        pass


@contextmanager
def serving_in_docker(image: str) -> Iterator[str]:
    """A server container from ``image`` (started as DockerBackend starts it); its URL."""
    from coding_gym.containers import ContainerSpec, lease_container

    lease = lease_container(ContainerSpec(image), shared=False)
    try:
        yield lease.container.base_url
    finally:
        lease.release()


def start_to_healthy(start: Callable[[], AbstractContextManager[str]], starts: int) -> list[float]:
    """Seconds from launch until ``GET /health`` answers 200, ``starts`` times."""
    samples = []
    for _ in range(starts):
        began = time.perf_counter()
        with start() as url:
            while True:
                try:
                    if httpx.get(f"{url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.01)
            samples.append(time.perf_counter() - began)
    return samples


def docker_steps(image: str, steps: int) -> list[float]:
    from coding_gym.backends.docker import DockerBackend

    with DockerBackend(image=image) as backend:
        backend.reset()
        return _timed(lambda: backend.run(CODE), steps)


def interleaved_steps(url: str, steps: int, block: int = 50) -> dict[str, list[float]]:
    """Step latency of LocalBackend, /ws and an HTTP session, sampled in turns of ``block``.

    Back to back within a turn (each design's steady state), in turns across the run: a
    change of machine load during the run weighs on all three alike, so their ratios hold
    even on a busy machine. Each design's first turn is a warm-up.
    """
    body = {"action": {"code": CODE}}
    with LocalBackend() as local, RemoteBackend(base_url=url) as remote, \
            httpx.Client(base_url=url) as http:
        local.reset()
        remote.reset()
        session_id = http.post("/sessions").json()["session_id"]
        headers = {"X-Session-Id": session_id}
        designs: dict[str, Callable[[], object]] = {
            "local_backend": lambda: local.run(CODE),
            "websocket": lambda: remote.run(CODE),
            "http_session": lambda: http.post("/step", json=body, headers=headers).json(),
        }
        samples: dict[str, list[float]] = {name: [] for name in designs}
        for turn in range(1 + -(-steps // block)):
            for name, step in designs.items():
                timed = _timed(step, block, warm_up=0)
                if turn > 0:
                    samples[name].extend(timed)
        http.delete(f"/sessions/{session_id}")
    return samples


def one_cpu_steps(steps: int) -> list[float] | None:
    """WebSocket step latency with the client's thread, the server and its worker all held
    to one CPU; None on a machine with one CPU (every run is held to it anyway)."""
    cpus = os.sched_getaffinity(0)
    if len(cpus) < 2:
        return None
    cpu = max(cpus)
    samples: list[float] = []

    def client() -> None:
        os.sched_setaffinity(0, (cpu,))  # this thread only
        with RemoteBackend(base_url=url) as remote:
            remote.reset()
            samples.extend(_timed(lambda: remote.run(CODE), steps))

    with serving(1, cpu=cpu) as url:
        thread = threading.Thread(target=client)
        thread.start()
        thread.join()
    if len(samples) < steps:
        raise RuntimeError("the WebSocket steps on one CPU did not all run (see above)")
    return samples


def http_stateless_steps(url: str, steps: int) -> list[float]:
    with httpx.Client(base_url=url) as http:
        body = {"action": {"code": CODE}}
        return _timed(lambda: http.post("/step", json=body).json(), steps, warm_up=3)


def episode_starts(url: str, samples: int) -> dict[str, list[float]]:
    """Seconds to start an episode, :data:`THINK_S` after the last sample, designs in turns:
    ``LocalBackend.reset()`` (starting its interpreter, and with it started ahead, the
    default), ``RemoteBackend.reset()``, and a stateless ``POST /step``."""
    with LocalBackend(start_ahead=False) as local, LocalBackend() as ahead, \
            RemoteBackend(base_url=url) as remote, httpx.Client(base_url=url) as http:
        local.reset()
        ahead.reset()
        remote.reset()
        body = {"action": {"code": CODE}}
        designs: dict[str, Callable[[], object]] = {
            "local_reset": local.reset,
            "local_reset_ahead": ahead.reset,
            "websocket_reset": remote.reset,
            "http_stateless_step": lambda: http.post("/step", json=body).json(),
        }
        times: dict[str, list[float]] = {name: [] for name in designs}
        for turn in range(samples + 2):  # the first two turns warm up
            for name, start in designs.items():
                time.sleep(THINK_S)
                began = time.perf_counter()
                start()
                if turn >= 2:
                    times[name].append(time.perf_counter() - began)
    return times


async def _throughput(url: str, sessions: int, seconds: float) -> dict[str, Any]:
    ws_url = url.replace("http://", "ws://") + "/ws"
    step = json.dumps({"type": "step", "data": {"code": CODE}})
    counts = [0] * sessions
    errors: list[str] = []
    start = asyncio.Event()

    async def session(index: int) -> None:
        try:
            # Without compression, as RemoteBackend connects: inflating and deflating every
            # message would weigh on the server's CPU, and on this client's.
            async with connect(ws_url, max_size=None, compression=None) as ws:
                await ws.send(json.dumps({"type": "reset"}))
                await ws.recv()
                await start.wait()
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    await ws.send(step)
                    reply = json.loads(await ws.recv())
                    if reply["type"] != "observation" or \
                            reply["data"]["observation"]["stdout"] != "1\n":
                        errors.append(str(reply)[:200])
                    counts[index] += 1
        except Exception as e:
            errors.append(f"{type(e).__name__}: {e}")

    tasks = [asyncio.create_task(session(i)) for i in range(sessions)]
    await asyncio.sleep(0.5)  # let every session connect and start its interpreter
    began = time.perf_counter()
    start.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - began
    return {"sessions": sessions, "steps": sum(counts), "steps_per_s": sum(counts) / elapsed,
            "errors": len(errors), "first_error": errors[0] if errors else None}


def run(steps: int = 500, stateless_steps: int = 30, seconds: float = 3.0,
        docker_image: str | None = None, starts: int = 5) -> dict[str, object]:
    throughput = []
    with serving(max(CONCURRENCY)) as url:
        samples = interleaved_steps(url, steps)
        samples["http_stateless"] = http_stateless_steps(url, stateless_steps)
        starts_ms = {name: _percentiles_ms(times)
                     for name, times in episode_starts(url, stateless_steps).items()}
        for sessions in CONCURRENCY:
            throughput.append(asyncio.run(_throughput(url, sessions, seconds)))
    one_cpu = one_cpu_steps(steps)
    if one_cpu is not None:
        samples["websocket_one_cpu"] = one_cpu
    latency = {name: _percentiles(samples[name]) for name in LATENCY_ROWS if name in samples}
    targets = {}
    startup: dict[str, dict[str, float]] = {}
    if docker_image is not None:
        latency["docker_websocket"] = _percentiles(docker_steps(docker_image, steps))
        for where, start in (("host", lambda: serving(1)),
                             ("docker", lambda: serving_in_docker(docker_image))):
            samples = start_to_healthy(start, starts)
            startup[where] = _percentiles_ms(samples)
        targets["docker_step_p50_at_most_2x_host"] = (
            latency["docker_websocket"]["p50_us"] <= 2 * latency["websocket"]["p50_us"])
        targets["docker_start_p50_at_most_2x_host"] = (
            startup["docker"]["p50_ms"] <= 2 * startup["host"]["p50_ms"])
    floor = latency["local_backend"]["p50_us"]
    for row in latency.values():
        row["p50_vs_local"] = row["p50_us"] / floor
    return {
        "benchmark": "server_latency",
        "code": CODE,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "latency": latency,
        "episode_starts": starts_ms,
        "think_s": THINK_S,
        "throughput": throughput,
        "start_to_healthy": startup,
        "targets": {
            "websocket_p50_at_most_3x_local": latency["websocket"]["p50_vs_local"] <= 3.0,
            "64_sessions_without_errors": throughput[-1]["errors"] == 0,
            **targets,
        },
    }


def print_table(report: dict[str, object]) -> None:
    latency: dict[str, dict[str, float]] = report["latency"]  # type: ignore[assignment]
    print(f"{'step':<18}{'p50 µs':>10}{'p95 µs':>10}{'n':>6}{'p50 / local':>14}")
    for name, row in latency.items():
        print(f"{name:<18}{row['p50_us']:>10.1f}{row['p95_us']:>10.1f}{row['n']:>6.0f}"
              f"{row['p50_vs_local']:>13.2f}x")
    starts: dict[str, dict[str, float]] = report["episode_starts"]  # type: ignore[assignment]
    print(f"\n{'episode start':<20}{'p50 ms':>10}{'p95 ms':>10}")
    for name, row in starts.items():
        print(f"{name:<20}{row['p50_ms']:>10.2f}{row['p95_ms']:>10.2f}")
    print(f"\n{'ws sessions':<18}{'steps/s':>10}{'steps':>8}{'errors':>8}")
    for row in report["throughput"]:  # type: ignore[attr-defined]
        print(f"{row['sessions']:<18}{row['steps_per_s']:>10.0f}{row['steps']:>8}"
              f"{row['errors']:>8}")
    startup: dict[str, dict[str, float]] = report["start_to_healthy"]  # type: ignore[assignment]
    if startup:
        print(f"\n{'start to healthy':<18}{'p50 ms':>10}{'p95 ms':>10}")
        for where, row in startup.items():
            print(f"{where:<18}{row['p50_ms']:>10.0f}{row['p95_ms']:>10.0f}")
    print("\ntargets:", ", ".join(f"{k}: {'met' if v else 'MISSED'}"
                                  for k, v in report["targets"].items()))  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description="server step latency and throughput")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--stateless-steps", type=int, default=30)
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="duration of each throughput level")
    parser.add_argument("--docker-image", default=None,
                        help="also measure the server in a container from this image "
                             "(for example coding-env:latest)")
    parser.add_argument("--starts", type=int, default=5,
                        help="server starts timed on the host and in Docker")
    args = parser.parse_args(argv)
    report = run(args.steps, args.stateless_steps, args.seconds, args.docker_image, args.starts)
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "server_latency.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
