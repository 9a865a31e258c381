"""Interpreters started ahead of the episodes that will need them.

Starting an episode's interpreter costs 5-7 ms even with the zygote's spares (the episode's
cgroups and directory, the worker's start-up in them) and closing one as much again (its
processes killed, its cgroups and directory removed). A session paid the start at its first
reset and at every reset after, and a stateless HTTP step paid both. The server keeps some
interpreters started ahead instead (``coding-gym serve --start-ahead N``, 1 by default): a
new session takes one, and so does the reset of a session whose interpreter has run code (its
own is then closed in the background). Each one taken is replaced in the pause that follows.

Interpreters ahead are not sessions and hold no slot: the server has at most
``max_sessions`` + N interpreters, and those being closed.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.server import stepping

logger = logging.getLogger(__name__)

#: How long after a take its replacement starts. Started at once, its start-up (the zygote's
#: spare, the new worker, this process's threads) ran beside the taker's own request: a
#: stateless HTTP step took 5.5-6.2 ms, against 3.9 ms with the start 15 ms later, and an
#: interpreter ready as often (29 or 30 steps in 30, 20 ms apart).
START_DELAY_S = 0.01


class InterpreterAhead:
    """Up to ``count`` :class:`LocalBackend` with their interpreter started, for the next
    takers (0: none, and :meth:`take` always says None).

    Methods are called on the event loop; starting and closing run in two threads of its own,
    so that they never wait behind the sessions' calls, nor those behind them.
    """

    def __init__(self, limits: Limits, count: int = 1) -> None:
        if count < 0:
            raise ValueError(f"count must be 0 or more, got {count}")
        self.limits = limits
        self.count = count
        self._threads = ThreadPoolExecutor(2, thread_name_prefix="coding-gym-ahead")
        self._ready: list[LocalBackend] = []
        self._starting: set[asyncio.Task[None]] = set()
        #: Takers waiting for a start under way: each may count on one.
        self._waiting = 0
        self._start_timer: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Future[None]] = set()
        self._stopped = False

    @property
    def ready(self) -> int:
        """Interpreters ready to be taken."""
        return len(self._ready)

    async def take(self) -> LocalBackend | None:
        """An interpreter started ahead: one ready, or else one starting that no other taker
        waits for (it is no further away than one the caller would start, and the two would
        slow each other down); None if there is neither. Its replacement starts
        :data:`START_DELAY_S` later."""
        if not self._ready and len(self._starting) > self._waiting:
            self._waiting += 1
            try:
                await asyncio.wait(set(self._starting), return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._waiting -= 1
        backend = None
        while self._ready and backend is None:
            backend = self._ready.pop(0)
            if not stepping.idle(backend):  # it died while it waited
                self.close_soon(backend)
                backend = None
        if self._start_timer is None and self.count and not self._stopped:
            self._start_timer = asyncio.get_running_loop().call_later(START_DELAY_S,
                                                                      self._timed_fill)
        return backend

    def _timed_fill(self) -> None:
        self._start_timer = None
        self.fill()

    def fill(self) -> None:
        """Start interpreters until ``count`` are ready or starting."""
        loop = asyncio.get_running_loop()
        while not self._stopped and len(self._ready) + len(self._starting) < self.count:
            self._starting.add(loop.create_task(self._start()))

    async def _start(self) -> None:
        backend: LocalBackend | None = None
        try:
            backend = LocalBackend(self.limits, start_ahead=False)
            await asyncio.get_running_loop().run_in_executor(self._threads, backend.reset)
        except Exception as e:  # noqa: BLE001 - the taker starts its own, and says why not
            logger.info("no interpreter started ahead: %s", e)
            if backend is not None:
                self.close_soon(backend)
            return
        finally:
            self._starting.discard(asyncio.current_task())
        if self._stopped:
            self.close_soon(backend)
        else:
            self._ready.append(backend)

    def close_soon(self, backend: LocalBackend) -> None:
        """Close ``backend`` in the background (:meth:`stop` waits for it)."""
        closing = asyncio.get_running_loop().run_in_executor(self._threads, backend.close)
        self._closing.add(closing)
        closing.add_done_callback(self._closed)

    def _closed(self, closing: asyncio.Future[None]) -> None:
        self._closing.discard(closing)
        if not closing.cancelled() and closing.exception() is not None:
            logger.warning("closing an interpreter failed: %s", closing.exception())

    async def stop(self) -> None:
        """Close every interpreter ahead and wait for every close under way; start no more."""
        self._stopped = True
        if self._start_timer is not None:
            self._start_timer.cancel()
            self._start_timer = None
        if self._starting:
            await asyncio.wait(set(self._starting))
        for backend in self._ready:
            self.close_soon(backend)
        self._ready.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self._threads.shutdown(wait=False)
