"""Helpers shared by the benchmarks: timing, percentiles, progress bars, results, plots."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

RESULTS = Path(__file__).parent / "results"
T = TypeVar("T")


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99 and mean of durations in seconds, in microseconds."""
    ordered = sorted(samples)
    return {
        "p50_us": ordered[len(ordered) // 2] * 1e6,
        "p95_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1e6,
        "p99_us": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e6,
        "mean_us": statistics.fmean(ordered) * 1e6,
        "n": len(ordered),
    }


def progress(iterable: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """``tqdm`` on stderr (one bar per measurement), quiet when stderr is not a terminal."""
    from tqdm import tqdm

    yield from tqdm(iterable, desc=f"{desc:<34}", total=total, leave=False, file=sys.stderr,
                    disable=not sys.stderr.isatty(), dynamic_ncols=True)


def interleaved(methods: dict[str, Callable[[], object]], samples: int, desc: str,
                block: int = 50, warm_up: int = 50) -> dict[str, list[float]]:
    """Time each method ``samples`` times, in turns of ``block`` calls, so that the load of the
    machine weighs on all of them alike."""
    for method in methods.values():
        for _ in range(warm_up):
            method()
    timings: dict[str, list[float]] = {name: [] for name in methods}
    rounds = max(1, -(-samples // block))
    perf_counter = time.perf_counter
    for _ in progress(range(rounds), desc):
        for name, method in methods.items():
            taken = timings[name]
            for _ in range(min(block, samples - len(taken))):
                start = perf_counter()
                method()
                taken.append(perf_counter() - start)
    return timings


def machine() -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpus": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "load_average_1min": load}


def write_json(name: str, report: dict[str, Any]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def figure(width: float = 7.5, height: float = 4.5) -> tuple[Any, Any]:
    """A matplotlib figure and axes (Agg backend, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(figsize=(width, height), dpi=110)
    axes.grid(True, which="both", alpha=0.3)
    return fig, axes


def save(fig: Any, name: str) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def plot_ecdf(name: str, title: str, samples: Mapping[str, Sequence[float]],
              unit: str = "µs", scale: float = 1e6) -> Path:
    """Latency distributions as empirical CDFs on a log axis, one line per design."""
    fig, axes = figure()
    for label, values in samples.items():
        ordered = sorted(v * scale for v in values)
        if not ordered:
            continue
        fractions = [(i + 1) / len(ordered) for i in range(len(ordered))]
        axes.step(ordered, fractions, where="post", label=f"{label} (n={len(ordered)})")
    axes.set_xscale("log")
    axes.set_xlabel(f"latency ({unit}, log scale)")
    axes.set_ylabel("fraction of samples at most")
    axes.set_title(title)
    axes.legend(fontsize=8, loc="lower right")
    return save(fig, name)


def pss_bytes(pid: int) -> int:
    """Proportional set size of a process (shared pages divided among their users)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss line in /proc/{pid}/smaps_rollup")


def print_rows(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = list(rows)
    first = max([len(header[0]), *(len(str(row[0])) for row in rows)])
    widths = [max(24, first + 2)] + [max(12, len(h) + 2) for h in header[1:]]
    print("".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}"
                  for i, (h, w) in enumerate(zip(header, widths, strict=True))))
    for row in rows:
        cells = []
        for i, (value, width) in enumerate(zip(row, widths, strict=True)):
            text = f"{value:.1f}" if isinstance(value, float) else str(value)
            cells.append(f"{text:<{width}}" if i == 0 else f"{text:>{width}}")
        print("".join(cells))


#: The smallest worker process that runs code and returns its output: length-prefixed code
#: in over a socket, ``exec`` with stdout captured in memory, length-prefixed output back.
#: What ``env.step`` adds on top (fd-level capture, limits, timers, tracebacks, accounting) is
#: the difference to it.
RAW_WORKER = """\
import io, socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
header = struct.Struct("<I")
namespace = {"__name__": "__main__"}
buffer = b""
while True:
    while len(buffer) < 4 or len(buffer) < 4 + header.unpack_from(buffer)[0]:
        data = sock.recv(65536)
        if not data:
            raise SystemExit
        buffer += data
    size = header.unpack_from(buffer)[0]
    code, buffer = buffer[4:4 + size].decode(), buffer[4 + size:]
    out = sys.stdout = io.StringIO()
    try:
        exec(code, namespace)
    except BaseException as error:
        out.write(repr(error))
    sys.stdout = sys.__stdout__
    reply = out.getvalue().encode()
    sock.sendall(header.pack(len(reply)) + reply)
"""


class RawWorker:
    """A :data:`RAW_WORKER` process and the parent's end of its socket."""

    HEADER = __import__("struct").Struct("<I")

    def __init__(self) -> None:
        import socket
        import subprocess

        self.sock, child = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", RAW_WORKER, str(child.fileno())],
                                     pass_fds=(child.fileno(),))
        child.close()
        self.buffer = b""

    def send(self, code: str) -> None:
        data = code.encode()
        self.sock.sendall(self.HEADER.pack(len(data)) + data)

    def feed(self, data: bytes) -> str | None:
        """Add received bytes; the reply once it is whole."""
        self.buffer += data
        if len(self.buffer) >= 4:
            size = self.HEADER.unpack_from(self.buffer)[0]
            if len(self.buffer) >= 4 + size:
                reply, self.buffer = self.buffer[4:4 + size], self.buffer[4 + size:]
                return reply.decode()
        return None

    def run(self, code: str) -> str:
        self.send(code)
        while True:
            reply = self.feed(self.sock.recv(65536))
            if reply is not None:
                return reply

    def close(self) -> None:
        self.sock.close()
        self.proc.wait()
