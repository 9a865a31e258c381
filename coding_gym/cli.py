"""``coding-gym``: serve the environment, or run a file in the sandbox.

    coding-gym serve [--host 127.0.0.1] [--port 8000] [--token T | --insecure] ...
    coding-gym run FILE.py
    coding-gym doctor [--json]
    coding-gym bench [--quick] [--only NAME ...] [--skip NAME ...]

Each command is a ``_cmd_<name>`` function registered in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from coding_gym import __version__
from coding_gym.models import Limits

_DEFAULTS = Limits()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coding-gym",
        description="A Gymnasium environment whose actions are Python programs.",
    )
    parser.add_argument("--version", action="version", version=f"coding-gym {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve the environment over HTTP and WebSocket (OpenEnv protocol)",
        description="Serve CodingEnv-v0 over HTTP and WebSocket, with a web UI at /web. "
                    "Each session gets its own sandboxed interpreter.",
    )
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8000,
                       help="port to listen on; 0 picks a free one (default: 8000)")
    serve.add_argument("--max-sessions", type=_positive_int, default=64,
                       help="sessions (interpreters) alive at once (default: 64)")
    serve.add_argument("--token", default=None,
                       help="token clients must send as 'Authorization: Bearer <token>' "
                            "(default: $CODING_GYM_TOKEN); needed to listen beyond loopback")
    serve.add_argument("--insecure", action="store_true",
                       help="listen beyond loopback without a token, answering any Host "
                            "name: anyone who can reach the port can run code on this machine")
    serve.add_argument("--start-ahead", type=_non_negative_int, default=1, metavar="N",
                       help="interpreters kept started for the next new sessions and "
                            "resets, beyond --max-sessions; 0 for none (default: 1)")
    serve.add_argument("--idle-timeout-s", type=_positive_float, default=600.0,
                       help="close sessions idle for this long (default: 600)")
    serve.add_argument("--ws-deflate", action="store_true",
                       help="accept WebSocket compression (permessage-deflate) from clients "
                            "that offer it: less traffic for large outputs over a slow link, "
                            "more CPU per message on both ends (default: declined)")
    serve.add_argument("--no-batch", action="store_true",
                       help="keep the event loop a normal thread instead of a batch thread "
                            "(SCHED_BATCH, the default: more steps/s with many sessions, the "
                            "same latency with one)")
    _add_limit_arguments(serve, "longest step a client may ask for")
    serve.add_argument("--open", action="store_true",
                       help="open the web UI in a browser once the server listens")
    serve.set_defaults(handler=_cmd_serve)

    run = commands.add_parser(
        "run", help="run a Python file in the sandbox",
        description="Run a Python file in a fresh sandboxed interpreter; its output goes to "
                    "stdout and stderr and its exit code becomes ours.",
    )
    run.add_argument("file", metavar="FILE.py", help="the program to run")
    _add_limit_arguments(run, "time limit of the program")
    run.set_defaults(handler=_cmd_run)

    doctor = commands.add_parser(
        "doctor", help="show which isolation layers protect sandboxed code here, and check them",
        description="Start one sandbox worker, print which isolation layers are active and why "
                    "the others are not, and check from inside the sandbox that the active ones "
                    "hold. Exit status: 0 all active, 1 some unavailable, 2 one does not hold.",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.set_defaults(handler=_cmd_doctor)

    bench = commands.add_parser(
        "bench", help="run the benchmark suite (needs a source checkout and the bench extra)",
        description="Run every benchmark of benchmarks/ (python -m benchmarks): progress bars, "
                    "JSON and PNG plots in benchmarks/results/, and a summary of ratios "
                    "against the targets.",
    )
    bench.add_argument("--quick", action="store_true", help="fewer samples: a minute or two")
    bench.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    bench.add_argument("--skip", nargs="+", metavar="NAME", help="leave these benchmarks out")
    bench.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``coding-gym`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.handler(args, parser)
    return code


def _cmd_doctor(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from coding_gym import doctor

    return doctor.run(as_json=args.json, out=sys.stdout)


def _cmd_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pathlib import Path

    checkout = Path(__file__).resolve().parent.parent
    if not (checkout / "benchmarks" / "__main__.py").is_file():
        _say(sys.stderr, "coding-gym bench: the benchmarks live in the source repository; "
             "run it from a checkout installed with pip install -e '.[bench]'")
        return 2
    sys.path.insert(0, str(checkout))
    from benchmarks.__main__ import main as run_benchmarks

    options = ["--quick"] if args.quick else []
    for flag, names in (("--only", args.only), ("--skip", args.skip)):
        if names:
            options += [flag, *names]
    return run_benchmarks(options)


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from coding_gym.backends.remote import TOKEN_ENV
    from coding_gym.server import serving
    from coding_gym.server.security import is_loopback

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV)
    token = token or None
    if not is_loopback(args.host) and token is None and not args.insecure:
        parser.error(
            f"refusing to listen on {args.host} without a token: anyone who can reach it could "
            f"run code on this machine. Pass --token T (or set {TOKEN_ENV}); clients then send "
            "'Authorization: Bearer T'. Or pass --insecure to accept the risk."
        )
    import uvicorn

    from coding_gym.server import create_app

    serving.tune_allocator()
    app = create_app(limits=_limits(args), max_sessions=args.max_sessions,
                     idle_timeout_s=args.idle_timeout_s, token=token,
                     any_host=args.insecure, start_ahead=args.start_ahead)
    try:
        sock = serving.bind(args.host, args.port)
    except OSError as e:
        print(f"coding-gym: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1
    url = serving.base_url(sock)
    _say(sys.stdout, f"coding-gym {__version__}: serving CodingEnv-v0 on {url}")
    _say(sys.stdout, f"web UI: {url}/web/" + ("  (it asks for the token)" if token else ""))
    if args.insecure and not is_loopback(args.host) and token is None:
        _say(sys.stderr, f"coding-gym: WARNING: no token; anyone who can reach {args.host} "
                         "can run code on this machine")
    if args.open:
        import webbrowser

        webbrowser.open(f"{url}/web/")
    serving.redact_tokens_in_logs()
    server = uvicorn.Server(serving.uvicorn_config(app, log_level="info",
                                                   ws_per_message_deflate=args.ws_deflate))
    interrupted: list[int] = []
    handle_exit = server.handle_exit

    def note_interrupt(sig: int, frame: Any) -> None:
        if sig == signal.SIGINT:
            interrupted.append(sig)
        handle_exit(sig, frame)

    # uvicorn re-raises Ctrl-C after its shutdown, but asyncio's runner may turn that into a
    # cancellation of a task that has already finished, and run() then returns normally.
    server.handle_exit = note_interrupt  # type: ignore[method-assign]
    if not args.no_batch:
        serving.wait_as_batch()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        interrupted.append(signal.SIGINT)
    finally:
        sock.close()
    # Ctrl-C, after a clean shutdown: exit as shells expect.
    return 130 if interrupted else 0


def _cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from coding_gym.backends.local import LocalBackend

    try:
        with open(args.file, encoding="utf-8") as f:
            code = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"coding-gym: cannot read {args.file}: {e}", file=sys.stderr)
        return 2
    with LocalBackend(_limits(args)) as backend:
        backend.reset()
        result = backend.run(code)
    _write(sys.stdout, result.stdout)
    _write(sys.stderr, result.stderr)
    for stream, truncated in (("stdout", result.stdout_truncated),
                              ("stderr", result.stderr_truncated)):
        if truncated:
            _say(sys.stderr, f"[coding-gym] {stream} was cut at {args.max_output_bytes} bytes")
    return result.exit_code


def _add_limit_arguments(parser: argparse.ArgumentParser, timeout_help: str) -> None:
    parser.add_argument("--timeout-s", type=_positive_float, default=_DEFAULTS.timeout_s,
                        help=f"{timeout_help}, in seconds (default: {_DEFAULTS.timeout_s:g})")
    parser.add_argument("--memory-mb", type=_positive_int, default=_DEFAULTS.memory_mb,
                        help=f"memory limit of an interpreter (default: {_DEFAULTS.memory_mb})")
    parser.add_argument("--max-output-bytes", type=_positive_int,
                        default=_DEFAULTS.max_output_bytes,
                        help="stdout and stderr kept per step, each "
                             f"(default: {_DEFAULTS.max_output_bytes})")


def _limits(args: argparse.Namespace) -> Limits:
    return Limits(timeout_s=args.timeout_s, memory_mb=args.memory_mb,
                  max_output_bytes=args.max_output_bytes)


def _write(stream: TextIO, text: str) -> None:
    # Bytes through the buffer: program output may hold characters the locale cannot encode.
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(text.encode("utf-8", "replace"))
        buffer.flush()
    else:
        stream.write(text)


def _say(stream: TextIO, line: str) -> None:
    print(line, file=stream, flush=True)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
