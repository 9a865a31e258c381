"""Running the app with uvicorn: in the foreground (``coding-gym serve``) or in a thread."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI

from coding_gym.server.wsprotocol import DirectFramesProtocol

_TOKEN_IN_URL = re.compile(r"([?&]token=)[^&\s\"]*")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def base_url(sock: socket.socket) -> str:
    """``http://host:port`` of a bound socket, for clients on this machine."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1" if sock.family == socket.AF_INET else "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def tune_allocator() -> bool:
    """Keep a long-running server's heap from growing with the threads that have used it.

    Session calls run in a pool of up to ``max_sessions`` threads, and glibc gives threads
    arenas of their own (up to eight per CPU): freed memory scattered over them stays
    resident, and idle memory crept up by several MB per busy minute. Python allocates
    almost only with the GIL held, so one arena costs no contention. Blocks over 256 KiB (large
    outputs) are mapped and unmapped as they come, instead of raising malloc's mapping
    threshold and settling in the heap. Call it before the server starts its threads;
    returns False where the C library does not take these settings.
    """
    from coding_gym.sandbox import libc

    return all([libc.mallopt(libc.M_ARENA_MAX, 1),
                libc.mallopt(libc.M_MMAP_THRESHOLD, 256 << 10)])


def wait_as_batch() -> bool:
    """Make the calling thread, which is about to run the server's event loop, a batch
    thread (``SCHED_BATCH``; its nice value is kept). Returns whether it did.

    The loop spends its time waiting for clients and for workers. As a normal thread, each
    message or reply that woke it preempted the worker running on that CPU; as a batch
    thread it waits for that worker to block or for the scheduler's tick. Measured with
    ``print(1)`` steps on a 2-vCPU VM, in turns against a normal server (four runs each):
    8 sessions 7.2k-7.7k steps/s against 5.9k-6.7k (p95 2.1-2.7 ms against 3.2-3.6 ms);
    32 sessions 6.2k-7.1k against 6.0k-7.4k, and one session 2.1k-2.4k against 2.3k (p50
    0.41-0.46 ms): no difference there. Measured again
    once the episodes were one group (see ``sandbox/cgroups.py``), three runs each in turns:
    on an idle machine 1, 8 and 32 sessions the same within 4%; beside a busy normal process
    8 sessions 4.5k against 3.6k, but 1 session 2.5k against 2.8k and 32 sessions 4.4k
    against 4.7k.

    Only a thread under ``SCHED_OTHER`` changes (one that its owner made real-time or idle
    is left alone). The threads it starts inherit the policy: those of slow steps, which
    wait for workers too. The zygote, and a worker spawned from this thread, are put back under
    the normal policy (``sandbox.affinity.reset_inherited``): they need it to start up
    quickly. Where the system calls are refused (seccomp in some containers) the thread
    stays as it is.
    """
    try:
        if os.sched_getscheduler(0) != os.SCHED_OTHER:
            return False
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        return False
    return True


def uvicorn_config(app: FastAPI, **options: Any) -> uvicorn.Config:
    """uvicorn settings for an app of :func:`create_app`; ``options`` go to uvicorn.Config.

    WebSocket compression (permessage-deflate) is declined unless
    ``ws_per_message_deflate=True``: clients that offer it (websockets' client, so OpenEnv's,
    and browsers) would otherwise get every message compressed and inflated on both ends,
    through uvicorn's frame parser rather than the direct path of ``wsprotocol.py``. With
    websockets' client on loopback, a ``print(1)`` step took 527 µs with it and 424 µs
    without; a step printing 100 kB, 1520 µs and 679 µs.
    """
    limit = getattr(app.state, "max_message_bytes", None)
    if limit is not None:
        # Room above the app's own limit, so an oversized message gets the app's error
        # reply; only a far larger one makes uvicorn drop the connection (close code 1009).
        options.setdefault("ws_max_size", 4 * limit)
    options.setdefault("ws", DirectFramesProtocol)
    options.setdefault("ws_per_message_deflate", False)
    return uvicorn.Config(app, **options)


class RedactTokens(logging.Filter):
    """Hide ``?token=...`` in log lines: WebSocket URLs of the web UI carry the token."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN_IN_URL.sub(r"\1***", a) if isinstance(a, str) else a
                                for a in record.args)
        return True


def redact_tokens_in_logs() -> None:
    """Install :class:`RedactTokens` on uvicorn's loggers."""
    for name in ("uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


class BackgroundServer:
    """An app served by uvicorn in a thread of this process, on loopback by default;
    ``options`` go to :func:`uvicorn_config`.

    Example:
        >>> from coding_gym.server import create_app
        >>> with BackgroundServer(create_app()) as server:  # doctest: +SKIP
        ...     env = gymnasium.make("CodingEnv-v0", backend="remote", base_url=server.url)
    """

    def __init__(self, app: FastAPI, *, host: str = "127.0.0.1", port: int = 0,
                 **options: Any) -> None:
        self.app = app
        self._sock = bind(host, port)
        self.url = base_url(self._sock)
        options.setdefault("log_level", "warning")
        options.setdefault("access_log", False)
        config = uvicorn_config(app, **options)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._sock]},
                                        name="coding-gym-server", daemon=True)

    def start(self, timeout_s: float = 30.0) -> BackgroundServer:
        """Start serving; returns once the server accepts connections."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop serving: connections are closed and every session's interpreter killed."""
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
