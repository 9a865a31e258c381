"""Real servers for tests: the app served by uvicorn on a free loopback port, and a bare
websockets server."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from websockets.sync.server import ServerConnection, serve

from coding_gym.models import Limits
from coding_gym.server import create_app
from coding_gym.server.serving import BackgroundServer
from coding_gym.server.sessions import SessionManager

#: Short step limit, so that tests of runaway code stay short.
TEST_LIMITS = Limits(timeout_s=5.0)


@contextmanager
def running_server(**options: Any) -> Iterator[BackgroundServer]:
    """``create_app(**options)`` served on 127.0.0.1; every session is closed on exit."""
    options.setdefault("limits", TEST_LIMITS)
    with BackgroundServer(create_app(**options)) as server:
        yield server


def sessions_of(server: BackgroundServer) -> SessionManager:
    manager: SessionManager = server.app.state.sessions
    return manager


def wait_for(condition: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (value := _poll(condition, deadline, timeout_s)):
        time.sleep(0.02)
    return value


async def until(condition: Callable[[], Any], timeout_s: float = 15.0) -> Any:
    """:func:`wait_for` on a running event loop, which keeps running meanwhile."""
    deadline = time.monotonic() + timeout_s
    while not (value := _poll(condition, deadline, timeout_s)):
        await asyncio.sleep(0.02)
    return value


def _poll(condition: Callable[[], Any], deadline: float, timeout_s: float) -> Any:
    """``condition()``; fail if it is still falsy at ``deadline``."""
    value = condition()
    assert value or time.monotonic() < deadline, f"condition not met within {timeout_s} s"
    return value


@contextmanager
def websockets_server(handler: Callable[[ServerConnection], None], **options: Any
                      ) -> Iterator[int]:
    """A websockets server on 127.0.0.1 running ``handler`` per connection; its port."""
    with serve(handler, "127.0.0.1", 0, **options) as ws_server:
        thread = threading.Thread(target=ws_server.serve_forever, daemon=True)
        thread.start()
        try:
            yield ws_server.socket.getsockname()[1]
        finally:
            ws_server.shutdown()
            thread.join(10)
