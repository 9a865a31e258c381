"""Memory of idle sessions: PSS (from /proc/PID/smaps_rollup) of N open episodes.

PSS divides each shared page among the processes that map it, so the PSS of all processes
adds up to what they really take. For N idle episodes (reset, one small step) it reports the
mean PSS of a worker and the cost per session including its share of the zygote, for workers
forked by the zygote (NumPy preloaded) and for workers spawned fresh; the default (forked
by the zygote, the next episode's interpreter started ahead) counts that second interpreter
in its sessions' cost too.

    python benchmarks/memory.py [--sessions 16]

Writes benchmarks/results/memory.json and memory.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    figure,
    machine,
    print_rows,
    progress,
    pss_bytes,
    save,
    write_json,
)

MB = 1 << 20


def _zygote_processes() -> list[int]:
    """The zygote and its spare child: the memory the sessions share."""
    from coding_gym.sandbox import processes, zygote

    found = zygote.get()
    if found is None:
        return []
    return [found.pid, *processes.descendants(found.pid)]


#: name: (start method, start_ahead)
VARIANTS = {"zygote, started ahead": ("zygote", True), "zygote": ("zygote", False),
            "spawn": ("spawn", False)}


def _measure(start_method: str, start_ahead: bool, sessions: int) -> dict[str, Any]:
    from coding_gym.backends.local import LocalBackend

    backends = [LocalBackend(start_method=start_method,  # type: ignore[arg-type]
                             start_ahead=start_ahead) for _ in range(sessions)]
    try:
        for backend in progress(backends, f"memory: {sessions} {start_method} sessions"):
            backend.reset()
            backend.run("x = 1")
        time.sleep(0.5)  # let start-up settle
        workers = [backend.worker_pid for backend in backends]
        worker_pss = [pss_bytes(pid) for pid in workers if pid is not None]
        waiting = {backend._next.backend.worker_pid for backend in backends
                   if backend._next is not None} - {None}
        ahead_pss = [pss_bytes(pid) for pid in waiting if pid is not None]
        shared = []
        if start_method == "zygote":
            busy = set(workers) | waiting
            shared = [pss_bytes(pid) for pid in _zygote_processes() if pid not in busy]
    finally:
        for backend in backends:
            backend.close()
    return {
        "sessions": sessions,
        "worker_pss_mb": sum(worker_pss) / len(worker_pss) / MB,
        "ahead_pss_mb": sum(ahead_pss) / len(worker_pss) / MB,
        "zygote_pss_mb": sum(shared) / MB,
        "per_session_mb": (sum(worker_pss) + sum(ahead_pss) + sum(shared))
        / len(worker_pss) / MB,
    }


def run(sessions: int = 16) -> dict[str, Any]:
    results = {name: _measure(method, ahead, sessions)
               for name, (method, ahead) in VARIANTS.items()}
    fig, axes = figure(6.5, 4)
    labels = ["worker alone", "per session, zygote share included"]
    for offset, name in ((-0.27, "zygote, started ahead"), (0.0, "zygote"), (0.27, "spawn")):
        values = [results[name]["worker_pss_mb"], results[name]["per_session_mb"]]
        axes.bar([i + offset for i in range(2)], values, 0.27, label=name)
    axes.set_xticks([0, 1], labels)
    axes.set_ylabel("PSS (MB)")
    axes.set_title(f"Idle session memory, {sessions} sessions")
    axes.legend()
    plot = save(fig, "memory")
    return {
        "benchmark": "memory",
        "machine": machine(),
        "results": results,
        "plot": plot.name,
        "targets": {"idle_session_at_most_10mb_pss":
                    results["zygote, started ahead"]["per_session_mb"] <= 10.0},
    }


def print_table(report: dict[str, Any]) -> None:
    print_rows(["start method", "worker MB", "ahead MB", "zygote MB", "per session MB"],
               [(name, row["worker_pss_mb"], row["ahead_pss_mb"], row["zygote_pss_mb"],
                 row["per_session_mb"]) for name, row in report["results"].items()])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="idle session memory (PSS)")
    parser.add_argument("--sessions", type=int, default=16)
    args = parser.parse_args(argv)
    report = run(args.sessions)
    print_table(report)
    print(f"\nwrote {write_json('memory', report)}")
    return report


if __name__ == "__main__":
    main()
