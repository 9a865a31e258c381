"""Run every benchmark and print one summary of ratios against the targets.

    python -m benchmarks [--quick] [--only NAME ...] [--skip NAME ...]
    coding-gym bench [same options]

Each benchmark writes ``benchmarks/results/<name>.json`` and a PNG plot; the summary goes to
``benchmarks/results/summary.json``. Ratios are taken within one run, so the load of the
machine weighs on both sides of each. ``--quick`` takes fewer samples (a minute or two).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))

from benchmarks.common import figure, machine, save, write_json

#: Benchmark -> arguments of its run(), (full, quick).
SUITE: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "step_latency": ({"steps": 2000, "spawn_steps": 50}, {"steps": 400, "spawn_steps": 5}),
    "reset_latency": ({"resets": 50, "spawn_resets": 15}, {"resets": 10, "spawn_resets": 3}),
    "vector_throughput": ({"seconds": 3.0, "max_envs": 16, "rounds": 5},
                          {"seconds": 0.6, "max_envs": 8, "rounds": 3}),
    "snapshots": ({"samples": 100}, {"samples": 15}),
    "memory": ({"sessions": 16}, {"sessions": 4}),
    "server_latency": ({"steps": 500, "stateless_steps": 30, "seconds": 3.0},
                       {"steps": 100, "stateless_steps": 5, "seconds": 1.0}),
}


def _plot_server(report: dict[str, Any]) -> str:
    fig, axes = figure(7.5, 4)
    latency = report["latency"]
    names = list(latency)
    axes.bar(names, [latency[n]["p50_us"] for n in names], label="p50")
    axes.scatter(names, [latency[n]["p95_us"] for n in names], color="black", marker="_",
                 s=400, label="p95", zorder=3)
    axes.set_yscale("log")
    axes.set_ylabel("step latency (µs, log scale)")
    axes.set_title('print(1) through the server beside the LocalBackend it wraps')
    axes.legend()
    return save(fig, "server_latency").name


def _row(metric: str, value: float | None, shown: str, target: str, met: bool | None
         ) -> dict[str, Any]:
    return {"metric": metric, "value": value, "shown": shown, "target": target, "met": met}


def summarize(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The ratios the targets are about, from whichever benchmarks ran."""
    rows = []
    if "step_latency" in reports:
        results = reports["step_latency"]["results"]
        step = results["env_step"]["p50_us"]
        for floor, label in (("worker_ping", "worker ping (same socket)"),
                             ("raw_pipe_round_trip", "raw pipe echo")):
            ratio = step / results[floor]["p50_us"]
            judged = floor == "worker_ping"
            rows.append(_row(f"env.step p50 / {label} p50", ratio,
                             f"{ratio:.2f}x ({step:.0f} / {results[floor]['p50_us']:.0f} µs)",
                             "<= 2.5x" if judged else "(context)",
                             ratio <= 2.5 if judged else None))
        ratio = results["fresh_spawn_per_step"]["p50_us"] / step
        rows.append(_row("fresh interpreter per step / env.step", ratio, f"{ratio:.0f}x",
                         "(context)", None))
    if "reset_latency" in reports:
        report = reports["reset_latency"]
        zygote = report["results"]["zygote, numpy"]["p50_us"] / 1000
        spawn = report["results"]["spawn, numpy"]["p50_us"] / 1000
        rows.append(_row("reset with numpy: fresh worker / zygote", report["numpy_speedup"],
                         f"{report['numpy_speedup']:.1f}x ({spawn:.0f} / {zygote:.1f} ms)",
                         ">= 20x", report["numpy_speedup"] >= 20))
        ahead = report["results"]["zygote, numpy, started ahead"]["p50_us"] / 1000
        back = report["results"]["zygote, numpy, started ahead, back to back"]["p50_us"] / 1000
        rows.append(_row("reset with numpy: zygote / started ahead (default)",
                         report["ahead_speedup"], f"{report['ahead_speedup']:.1f}x ({zygote:.1f} "
                         f"/ {ahead:.2f} ms; back to back {back:.1f} ms)", "(context)", None))
        episode = {name: sum(part["p50_us"] for part in parts.values()) / 1000
                   for name, parts in report["task_episodes"].items()}
        one, started = episode["one interpreter"], episode["started ahead"]
        rows.append(_row("task episode, reset + graded step: one interpreter / started ahead",
                         one / started, f"{one / started:.1f}x ({one:.1f} / {started:.1f} ms)",
                         "(context)", None))
    if "vector_throughput" in reports:
        ratios = reports["vector_throughput"]["ratios"]
        rate = reports["vector_throughput"]["steps_per_second"]
        n = str(ratios["envs"])
        rows.append(_row(f"native vector, {n} envs / raw worker ceiling",
                         ratios["native_vs_raw_ceiling"],
                         f"{ratios['native_vs_raw_ceiling']:.0%} ({rate['native'][n]:.0f} / "
                         f"{rate['raw ceiling'][n]:.0f} steps/s)", ">= 80%",
                         ratios["native_vs_raw_ceiling"] >= 0.8))
        rows.append(_row(f"native vector, {n} envs / AsyncVectorEnv", ratios["native_vs_async"],
                         f"{ratios['native_vs_async']:.1f}x ({rate['async'][n]:.0f} steps/s "
                         "async)", ">= 3x", ratios["native_vs_async"] >= 3.0))
        loaded = reports["vector_throughput"]["under_load"]
        for name, rates in loaded["steps_per_second"].items():
            ratio = rates["native"] / rates["async"]
            rows.append(_row(f"native vector, {loaded['envs']} envs / AsyncVectorEnv, beside "
                             f"{name.removeprefix('one ').removeprefix('a ')}", ratio,
                             f"{ratio:.1f}x ({rates['native']:.0f} / {rates['async']:.0f} "
                             "steps/s)", "(context)", None))
    if "memory" in reports:
        row = reports["memory"]["results"]["zygote, started ahead"]
        one = reports["memory"]["results"]["zygote"]["per_session_mb"]
        rows.append(_row(f"idle session PSS ({row['sessions']} sessions, zygote share in)",
                         row["per_session_mb"], f"{row['per_session_mb']:.1f} MB "
                         f"(worker alone {row['worker_pss_mb']:.1f} MB; without the one "
                         f"started ahead {one:.1f} MB)", "<= 10 MB",
                         row["per_session_mb"] <= 10.0))
    if "snapshots" in reports:
        results = reports["snapshots"]["results"]
        pair = results["bare"]["snapshot + restore"]["p50_us"] / 1000
        numpy_pair = results["numpy"]["snapshot + restore"]["p50_us"] / 1000
        rows.append(_row("snapshot + restore, small interpreter", pair,
                         f"{pair:.2f} ms ({numpy_pair:.2f} ms with numpy loaded)", "<= 5 ms",
                         pair <= 5.0))
        fork = results["bare"]["fork"]["p50_us"] / 1000
        step, transactional = (results["bare"][k]["p50_us"] for k in
                               ("step", "transactional step"))
        rows.append(_row("fork / transactional step", fork,
                         f"{fork:.2f} ms / {transactional / 1000:.2f} ms "
                         f"(plain step {step / 1000:.2f} ms)", "(context)", None))
    if "server_latency" in reports:
        latency = reports["server_latency"]["latency"]
        for name, bound in (("websocket", 3.0), ("websocket_one_cpu", None),
                            ("http_session", None)):
            if name not in latency:
                continue  # websocket_one_cpu, on a machine with one CPU
            ratio = latency[name]["p50_vs_local"]
            rows.append(_row(f"server {name} p50 / LocalBackend p50", ratio,
                             f"{ratio:.2f}x ({latency[name]['p50_us']:.0f} µs)",
                             f"<= {bound:g}x" if bound else "(context)",
                             ratio <= bound if bound else None))
        starts = reports["server_latency"]["episode_starts"]
        ws, local = starts["websocket_reset"]["p50_ms"], starts["local_reset"]["p50_ms"]
        rows.append(_row("server websocket reset p50 / LocalBackend reset p50", ws / local,
                         f"{ws / local:.2f}x ({ws:.2f} / {local:.2f} ms; started ahead "
                         f"{starts['local_reset_ahead']['p50_ms']:.2f} ms; stateless step "
                         f"{starts['http_stateless_step']['p50_ms']:.2f} ms)", "(context)",
                         None))
    return rows


def print_summary(rows: list[dict[str, Any]]) -> None:
    width = max(len(row["metric"]) for row in rows) + 2
    shown = max(len(row["shown"]) for row in rows) + 2
    print(f"\n{'metric':<{width}}{'result':<{shown}}{'target':<10}status")
    for row in rows:
        status = {True: "met", False: "MISSED", None: ""}[row["met"]]
        print(f"{row['metric']:<{width}}{row['shown']:<{shown}}{row['target']:<10}{status}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="run the benchmark suite of coding_gym")
    parser.add_argument("--quick", action="store_true", help="fewer samples: a minute or two")
    parser.add_argument("--only", nargs="+", choices=sorted(SUITE), metavar="NAME",
                        help=f"run only these: {', '.join(SUITE)}")
    parser.add_argument("--skip", nargs="+", choices=sorted(SUITE), default=[],
                        metavar="NAME", help="leave these out")
    args = parser.parse_args(argv)
    names = [n for n in (args.only or SUITE) if n not in args.skip]
    from tqdm import tqdm

    reports: dict[str, dict[str, Any]] = {}
    bar = tqdm(names, desc="benchmarks", file=sys.stderr, disable=not sys.stderr.isatty())
    for name in bar:
        bar.set_postfix_str(name)
        module = importlib.import_module(f"benchmarks.{name}")
        report = module.run(**SUITE[name][1 if args.quick else 0])
        if name == "server_latency":
            report["plot"] = _plot_server(report)
        reports[name] = report
        write_json(name, report)
        tqdm.write(f"\n== {name} ==", file=sys.stdout)
        module.print_table(report)
    rows = summarize(reports)
    print_summary(rows)
    path = write_json("summary", {"quick": args.quick, "machine": machine(), "rows": rows,
                                  "plots": {n: r.get("plot") for n, r in reports.items()}})
    print(f"\nresults and plots in {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
