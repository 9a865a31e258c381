"""Soak: many sessions running a random mix of ordinary and hostile programs, for a while.

``coding-gym serve`` runs in a child process on a loopback port (with a token). N client
threads each hold a session (``backend="remote"``) and, until the time is up, step programs
drawn at random: mostly ordinary ones whose output is checked, some hostile ones (endless
loops, memory and fork bombs, crashes, floods of output, daemons left behind, broken fds),
resetting now and then. It then closes every session, lets the server go idle, and compares
the server with how it was after the warm-up (5 minutes of the same load by default).

Reported: errors (an exception from the client, an infrastructure error, a wrong answer to
an ordinary program, a step that took longer than its limit plus one second; counted by kind,
and a slow step by where its time went: in the sandbox, or in a reply that also waited for a
new interpreter after the last step killed one, or elsewhere; an ordinary program that a
limit stopped, saying so (earlier hostile steps of its episode used up its memory, or the
CPUs were too busy for it), is listed but is no error), growth of the
server's resident memory (its own and that of its descendants, idle before and after),
processes left behind, and the server's fds. Targets over 10 minutes with 32 sessions:
0 errors, under 5 % memory growth, 0 processes left.

    python benchmarks/soak.py [--minutes 10] [--warm-up-minutes 5] [--sessions 32] [--seed 0]
                              [--json PATH]

Only loopback is used, and the script stops by itself (a watchdog ends it if the server
hangs). Exit status 0 when the targets are met.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from coding_gym.env import CodingEnv
from coding_gym.sandbox.processes import descendants, rss_kb

TOKEN = "soak-token"
TIMEOUT_S = 2.0
MEMORY_MB = 256
#: How much longer than its limit a step may take.
SLACK_S = 1.0
#: The kind of report that is no fault of the sandbox (see session_loop).
_NOT_AN_ERROR = "ordinary program stopped by a limit, saying so"
#: Share of steps that run a hostile program.
HOSTILE_SHARE = 0.3
RESET_SHARE = 0.1

#: Ordinary programs and the exact stdout they must produce.
ORDINARY: list[tuple[str, str]] = [
    ("print(sum(i * i for i in range(10_000)))", "333283335000\n"),
    ("import numpy as np\nprint(int(np.arange(10).sum()))", "45\n"),
    ("import json\nprint(json.dumps({'a': [1, 2]}))", '{"a": [1, 2]}\n'),
    ("print('x' * 2000)", "x" * 2000 + "\n"),
    ("def f(n):\n    return n if n < 2 else f(n - 1) + f(n - 2)\nprint(f(18))", "2584\n"),
    ("import os\nopen('note.txt', 'w').write('hi')\nprint(open('note.txt').read())", "hi\n"),
]

#: Hostile programs; only their timing and the absence of infrastructure errors are checked.
HOSTILE: dict[str, str] = {
    "python loop": "while True:\n    pass",
    "C loop": "sum(range(10 ** 13))",
    "sleep": "import time\ntime.sleep(1000)",
    "memory bomb": "b = []\nwhile True:\n    b.append(bytearray(32 << 20))",
    "print 50 MB": "print('x' * 50_000_000)",
    "no newline flood": "import sys\nwhile True:\n    sys.stdout.write('y' * 4096)",
    "os._exit": "import os\nos._exit(7)",
    "segfault": "import ctypes\nctypes.string_at(0)",
    "abort": "import os\nos.abort()",
    "daemon": "import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)",
    "threads": "import threading, time\n"
               "for _ in range(4):\n    threading.Thread(target=time.sleep, args=(1000,)).start()",
    "close fds": "import os\nfor fd in (0, 1, 2):\n    os.close(fd)",
    "broken builtins": "import builtins\nbuiltins.print = None\nbuiltins.__import__ = None",
    "garbage on fds": "import os\nfor fd in range(3, 256):\n    try:\n"
                      "        os.write(fd, b'\\xff' * 16)\n    except OSError:\n        pass",
    "fill /tmp": "f = open('/tmp/fill', 'wb')\nwhile True:\n    f.write(bytes(1 << 20))",
    "100k fds": "fs = [open('/dev/null') for _ in range(100_000)]",
    "deep recursion": "def f():\n    return f()\nf()",
    "stop itself": "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
                 "        pass",
}
#: Programs that could harm the machine unless one of these layers is active.
NEEDS = {"fork bomb": ("cgroup", "user")}


@dataclass
class Tally:
    steps: int = 0
    resets: int = 0
    hostile: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    #: Errors by kind, so that slow replies can be told apart (see :func:`session_loop`).
    kinds: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def error(self, text: str, kind: str) -> None:
        with self.lock:
            self.kinds[kind] += 1
            if len(self.errors) < 200:
                self.errors.append(text)


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): tells a process from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rfind(b")") + 2:].split()[19])


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            text = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        with open(f"/proc/{pid}/status") as f:
            state = next(line.split(None, 1)[1].strip() for line in f
                         if line.startswith("State:"))
    except (OSError, StopIteration):
        return "?"
    return f"{text[:100]} [{state}]"


def snapshot(server_pid: int) -> dict[str, Any]:
    pids = descendants(server_pid)
    return {
        "server_rss_kb": rss_kb(server_pid),
        "total_rss_kb": rss_kb(server_pid) + sum(rss_kb(pid) for pid in pids),
        "processes": len(pids),
        "server_fds": len(os.listdir(f"/proc/{server_pid}/fd")),
    }


def start_server(sessions: int) -> tuple[subprocess.Popen[bytes], str, str]:
    fd, log = tempfile.mkstemp(prefix="coding-gym-soak-", suffix=".log")
    process = subprocess.Popen(
        [sys.executable, "-m", "coding_gym.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         "--token", TOKEN, "--timeout-s", str(TIMEOUT_S), "--memory-mb", str(MEMORY_MB),
         "--max-sessions", str(sessions + 8)],
        stdout=fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    os.close(fd)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        with open(log) as f:
            found = re.search(r"serving CodingEnv-v0 on (http://127\.0\.0\.1:\d+)", f.read())
        if found:
            return process, found.group(1), log
        time.sleep(0.05)
    process.kill()
    with open(log) as f:
        raise SystemExit(f"coding-gym serve did not start:\n{f.read()}")


def wait_idle(url: str, server_pid: int, timeout_s: float = 60.0) -> None:
    """Until the server has no session and its processes have stopped changing."""
    deadline = time.monotonic() + timeout_s
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while time.monotonic() < deadline:
        if httpx.get(f"{url}/sessions", headers=headers, timeout=10).json()["active"] == 0:
            break
        time.sleep(0.1)
    previous, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        now = sorted(descendants(server_pid))
        if now != previous:
            previous, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since > 2:
            return
        time.sleep(0.1)


def session_loop(index: int, url: str, until: float, seed: int, hostile: list[str],
                 tally: Tally) -> None:
    rng = random.Random(seed * 1000 + index)
    try:
        env = CodingEnv("remote", base_url=url, token=TOKEN, timeout_s=TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - every failure is counted, none ends the soak
        tally.error(f"session {index}: could not connect: {e}", "exception")
        return
    with env:
        try:
            env.reset()
        except Exception as e:  # noqa: BLE001
            tally.error(f"session {index}: first reset failed: {type(e).__name__}: {e}",
                        "exception")
            return
        # Whether the last step killed the interpreter: the next one then waits for a new
        # worker, the part of a reply that CPU starvation stretches most.
        replaced = False
        while time.monotonic() < until:
            try:
                if rng.random() < RESET_SHARE:
                    env.reset()
                    with tally.lock:
                        tally.resets += 1
                if rng.random() < HOSTILE_SHARE:
                    name = rng.choice(hostile)
                    code, expected = HOSTILE[name], None
                else:
                    name = ""
                    code, expected = rng.choice(ORDINARY)
                started = time.monotonic()
                observation, _, _, truncated, info = env.step(code)
                elapsed = time.monotonic() - started
            except Exception as e:  # noqa: BLE001
                tally.error(f"session {index}: {type(e).__name__}: {e}", "exception")
                continue
            with tally.lock:
                tally.steps += 1
                tally.slowest_s = max(tally.slowest_s, elapsed)
                if name:
                    tally.hostile[name] += 1
            label = name or code.splitlines()[0]
            if info.get("infra_error") or truncated:
                tally.error(f"session {index}: infrastructure error on {label!r}: "
                            f"{info.get('infra_error')}", "infrastructure")
            if elapsed > TIMEOUT_S + SLACK_S:
                # The server's own measure of the step tells a slow sandbox from queueing.
                in_sandbox = float(info.get("wall_time_s", elapsed))
                kind = ("slow: over the limit in the sandbox" if in_sandbox > TIMEOUT_S + SLACK_S
                        else "slow: reply, after a killed interpreter" if replaced
                        else "slow: reply")
                tally.error(f"session {index}: {label!r} took {elapsed:.2f} s (in the sandbox "
                            f"{in_sandbox:.2f} s)", kind)
            if expected is not None and observation["stdout"] != expected:
                # An ordinary program stopped by a limit, and saying so, is no wrong answer of
                # the sandbox: a memory bomb's list or a full /tmp from an earlier step of the
                # episode still holds its memory, or the CPUs were too busy for it to finish
                # in time. Counted apart.
                kind = _NOT_AN_ERROR if info.get("kill_reason") else "wrong answer"
                tally.error(f"session {index}: {label!r} printed "
                            f"{observation['stdout'][:80]!r} (exit {observation['exit_code']}, "
                            f"stderr {observation['stderr'][-200:]!r})", kind)
            replaced = bool(info.get("state_lost"))


def active_layers() -> dict[str, bool]:
    from coding_gym.backends.local import LocalBackend

    # Spawned, not forked from a zygote: a zygote of this process would outlive the server
    # and count as a process left behind.
    with LocalBackend(start_method="spawn") as probe:
        probe.reset()
        return {name: layer["active"] for name, layer in probe.describe()["isolation"].items()}


def run_sessions(url: str, until: float, sessions: int, seed: int, hostile: list[str],
                 tally: Tally, seen: dict[int, int | None], server_pid: int) -> dict[str, int]:
    """``sessions`` client threads until ``until``; samples the server; returns the peaks."""
    threads = [threading.Thread(target=session_loop, args=(i, url, until, seed, hostile, tally))
               for i in range(sessions)]
    for thread in threads:
        thread.start()
    peak = snapshot(server_pid)
    while any(thread.is_alive() for thread in threads):
        now = snapshot(server_pid)
        peak = {key: max(peak[key], now[key]) for key in peak}
        for pid in descendants(server_pid):
            seen.setdefault(pid, start_time(pid))
        time.sleep(0.5)
    return peak


def soak(minutes: float, sessions: int, seed: int, warm_up_minutes: float = 5.0
         ) -> dict[str, Any]:
    layers = active_layers()
    hostile = [name for name in HOSTILE
               if not NEEDS.get(name) or any(layers.get(n) for n in NEEDS[name])]
    process, url, log = start_server(sessions)
    # Idle memory climbs for the first minutes of load, then levels off. Measured here with
    # tracemalloc and mallinfo2: Python's objects stay flat from the first minute while the
    # allocators' pages fill unevenly, ~4 MB more by minute 5, then ~0.1 MB a minute. So the
    # baseline follows the whole warm-up; the first minute's idle memory is reported beside.
    warm_up_s = warm_up_minutes * 60
    first_minute_s = min(60.0, warm_up_s)
    watchdog = threading.Timer(warm_up_s + minutes * 60 + 420, process.kill)
    watchdog.start()

    def load_then_idle(seconds: float, seed: int, tally: Tally, seen: dict[int, int | None]
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Every session for ``seconds``, then idle: the peak, and the idle snapshot."""
        peak = run_sessions(url, time.monotonic() + seconds, sessions, seed, hostile, tally,
                            seen, process.pid)
        wait_idle(url, process.pid)
        return peak, snapshot(process.pid)

    try:
        warm = Tally()
        _, first_minute = load_then_idle(first_minute_s, seed + 1, warm, {})
        _, baseline = load_then_idle(warm_up_s - first_minute_s, seed + 2, warm, {})
        tally = Tally(errors=[f"warm-up: {error}" for error in warm.errors],
                      kinds=Counter({f"warm-up, {kind}": n for kind, n in warm.kinds.items()}))
        seen: dict[int, int | None] = {}
        peak, final = load_then_idle(minutes * 60, seed, tally, seen)
        healthy = httpx.get(f"{url}/health", timeout=10).status_code == 200
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        watchdog.cancel()
        os.unlink(log)
    # Anything seen under the server must be gone with it, even if it escaped to init.
    deadline = time.monotonic() + 15
    while True:
        left = [pid for pid, started in seen.items()
                if started is not None and start_time(pid) == started]
        left += descendants(os.getpid())
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    left_described = [f"{pid}: {cmdline(pid)}" for pid in left]
    growth = (final["total_rss_kb"] - baseline["total_rss_kb"]) / baseline["total_rss_kb"]
    early_growth = ((final["total_rss_kb"] - first_minute["total_rss_kb"])
                    / first_minute["total_rss_kb"])
    return {
        "minutes": minutes, "warm_up_s": warm_up_s, "sessions": sessions, "seed": seed,
        "isolation": layers,
        "steps": tally.steps, "resets": tally.resets, "hostile_steps": dict(tally.hostile),
        "errors": tally.errors, "error_kinds": dict(tally.kinds),
        "slowest_step_s": round(tally.slowest_s, 3),
        "first_minute": first_minute, "baseline": baseline, "peak": peak, "final": final,
        "rss_growth_percent": round(100 * growth, 2),
        "rss_growth_since_first_minute_percent": round(100 * early_growth, 2),
        "processes_left_in_server": final["processes"] - baseline["processes"],
        "processes_left_after_stop": len(left),
        "left_after_stop": left_described,
        "server_fd_growth": final["server_fds"] - baseline["server_fds"],
        "server_healthy": healthy,
        "platform": f"{os.uname().sysname} {os.uname().release}, {os.cpu_count()} CPUs",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak time (default: 10)")
    parser.add_argument("--warm-up-minutes", type=float, default=5.0,
                        help="load before the memory baseline is taken (default: 5)")
    parser.add_argument("--sessions", type=int, default=32, help="concurrent sessions (32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random mix (0)")
    parser.add_argument("--json", metavar="PATH", help="also write the results there")
    args = parser.parse_args(argv)
    results = soak(args.minutes, args.sessions, args.seed, args.warm_up_minutes)
    print(f"{results['sessions']} sessions for {results['minutes']:g} min: "
          f"{results['steps']} steps ({sum(results['hostile_steps'].values())} hostile), "
          f"{results['resets']} resets, slowest step {results['slowest_step_s']} s")
    print(f"reports: {sum(results['error_kinds'].values())} "
          + ", ".join(f"{n} {kind}" for kind, n in sorted(results["error_kinds"].items())))
    for error in results["errors"][:20]:
        print(f"  {error}")
    print(f"memory (server and descendants, idle): {results['baseline']['total_rss_kb']} kB -> "
          f"{results['final']['total_rss_kb']} kB ({results['rss_growth_percent']:+.2f} %), "
          f"peak {results['peak']['total_rss_kb']} kB; since the first minute of warm-up "
          f"{results['rss_growth_since_first_minute_percent']:+.2f} %")
    print(f"processes left: {results['processes_left_in_server']} in the server, "
          f"{results['processes_left_after_stop']} after it stopped; server fds "
          f"{results['server_fd_growth']:+d}; healthy at the end: {results['server_healthy']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    errors = {kind: n for kind, n in results["error_kinds"].items()
              if not kind.endswith(_NOT_AN_ERROR)}
    met = (not errors and results["rss_growth_percent"] < 5
           and results["processes_left_in_server"] == 0
           and results["processes_left_after_stop"] == 0 and results["server_healthy"])
    print("targets met" if met else "targets NOT met")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())

