"""The server in a Docker container against the same server run directly on this host.

Side by side in one run:
- start-to-healthy: from launch (``coding-gym serve`` as a host process, or a container from
  the image) until ``GET /health`` answers 200;
- ``env.step("print(1)")`` through the remote backend to the host server and through the
  docker backend to the container (both speak the same WebSocket protocol).

    python benchmarks/docker_latency.py [--image coding-env:latest] [--steps 1000] [--starts 5]

Needs a Docker engine and the image (scripts/docker-engine.sh && scripts/build-image.sh).
Prints a table and writes benchmarks/results/docker_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

CODE = "print(1)"
RESULTS = Path(__file__).parent / "results"
_SERVING = re.compile(r"serving CodingEnv-v0 on (http://\S+)")


def _summary(samples: list[float], unit: float, suffix: str) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        f"p50_{suffix}": ordered[len(ordered) // 2] * unit,
        f"p95_{suffix}": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * unit,
        f"mean_{suffix}": statistics.fmean(ordered) * unit,
        "n": len(ordered),
    }


@contextmanager
def host_server() -> Iterator[tuple[str, float]]:
    """``coding-gym serve`` on a free loopback port: its URL and its start-to-healthy time."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "coding_gym.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "CODING_GYM_TOKEN": ""},
    )
    try:
        assert proc.stdout is not None
        url = None
        for line in proc.stdout:
            match = _SERVING.search(line)
            if match:
                url = match.group(1)
                break
        if url is None:
            raise RuntimeError("coding-gym serve exited before it printed its address")
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.01)
        yield url, time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(30)


def host_start_to_healthy(starts: int) -> list[float]:
    samples = []
    for _ in range(starts):
        with host_server() as (_, seconds):
            samples.append(seconds)
    return samples


def docker_start_to_healthy(image: str, starts: int) -> list[float]:
    from coding_gym.containers import ContainerSpec, lease_container

    samples = []
    for _ in range(starts):
        started = time.perf_counter()
        lease = lease_container(ContainerSpec(image), shared=False)
        samples.append(time.perf_counter() - started)
        lease.release()
    return samples


def step_samples(steps: int, **env_options: object) -> list[float]:
    from coding_gym.env import CodingEnv

    samples = []
    with CodingEnv(**env_options) as env:  # type: ignore[arg-type]
        env.reset(seed=0)
        for _ in range(100):  # warm-up
            env.step(CODE)
        for _ in range(steps):
            start = time.perf_counter()
            env.step(CODE)
            samples.append(time.perf_counter() - start)
    return samples


def run(image: str, steps: int, starts: int) -> dict[str, object]:
    with host_server() as (url, _):
        host_steps = step_samples(steps, backend="remote", base_url=url)
    docker_steps = step_samples(steps, backend="docker", image=image)
    results = {
        "start_to_healthy": {
            "host": _summary(host_start_to_healthy(starts), 1e3, "ms"),
            "docker": _summary(docker_start_to_healthy(image, starts), 1e3, "ms"),
        },
        "step": {
            "host": _summary(host_steps, 1e6, "us"),
            "docker": _summary(docker_steps, 1e6, "us"),
        },
    }
    for kind, unit in (("start_to_healthy", "ms"), ("step", "us")):
        row = results[kind]
        row["docker"]["p50_vs_host"] = row["docker"][f"p50_{unit}"] / row["host"][f"p50_{unit}"]
    return {
        "benchmark": "docker_latency",
        "code": CODE,
        "image": image,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "results": results,
    }


def print_table(report: dict[str, object]) -> None:
    results = report["results"]
    print(f"{'measure':<20}{'where':<8}{'p50':>12}{'p95':>12}{'n':>6}{'p50 / host':>12}")
    for kind, unit in (("start_to_healthy", "ms"), ("step", "us")):
        for where in ("host", "docker"):
            row = results[kind][where]  # type: ignore[index]
            ratio = f"{row['p50_vs_host']:.2f}x" if "p50_vs_host" in row else ""
            print(f"{kind:<20}{where:<8}{row[f'p50_{unit}']:>9.1f} {unit}"
                  f"{row[f'p95_{unit}']:>9.1f} {unit}{row['n']:>6}{ratio:>12}")


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description="the server in Docker against on the host")
    parser.add_argument("--image", default="coding-env:latest")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--starts", type=int, default=5)
    args = parser.parse_args(argv)
    report = run(args.image, args.steps, args.starts)
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "docker_latency.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")
    return report


if __name__ == "__main__":
    main()
