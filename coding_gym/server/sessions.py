"""Sessions of the server: one LocalBackend each, a fixed capacity, idle sessions reaped.

A session is one client's episode: a WebSocket connection, an HTTP session
(``POST /sessions``), or a single stateless HTTP step. Backend calls block, so they run in a
thread pool with one thread per possible session; a session runs one call at a time, which
keeps its steps in order and the pool never short of a thread. Quick steps are the exception:
their reply is read on the event loop (:mod:`coding_gym.server.stepping`). Sessions take
their interpreters started ahead where they can (:mod:`coding_gym.server.ahead`).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from coding_gym.models import Limits
from coding_gym.sandbox import steps
from coding_gym.server import stepping
from coding_gym.server.ahead import InterpreterAhead
from coding_gym.server.session import Session

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How long a new session may wait for the slot of one whose client has left (its
#: interpreter is being killed): a client that reconnects at once must not be turned away.
CLOSING_WAIT_S = 10.0


class CapacityReached(Exception):
    """Every session slot is taken."""

    def __init__(self, max_sessions: int) -> None:
        super().__init__(
            f"the server is at capacity: all {max_sessions} sessions are in use. Retry later, "
            "close sessions you no longer need, or start the server with a larger "
            "--max-sessions"
        )
        self.max_sessions = max_sessions


#: How often a step waiting behind a call of its own client looks at who holds the turn.
_CLIENT_CALL_POLL_S = 0.1


class _Turn:
    """``async with``: hold the session's lock and mark it busy.

    A class rather than ``@asynccontextmanager``, whose generator and wrappers cost a few
    microseconds on every step.
    """

    __slots__ = ("session", "client")

    def __init__(self, session: Session, client: bool = True) -> None:
        self.session = session
        #: A call of the session's client, not one the server makes on its own.
        self.client = client

    async def __aenter__(self) -> None:
        await self.session.lock.acquire()
        _begin_turn(self.session, self.client)

    async def __aexit__(self, *exc: object) -> None:
        _end_turn(self.session, self.client)


def _begin_turn(session: Session, client: bool) -> None:
    session.busy = True
    session.serving_client = client


def _end_turn(session: Session, client: bool) -> None:
    session.busy = session.serving_client = False
    session.last_active = time.monotonic()
    if client:
        session.answered_at = session.last_active
    session.lock.release()


class SessionManager:
    """Owns every session: opens them up to ``max_sessions``, runs their calls, reaps the idle.

    Args:
        limits: Limits of every session's interpreter; clients may only shorten the timeout.
        max_sessions: Sessions (so interpreters) alive at once.
        idle_timeout_s: A session without a request for this long is closed.
        start_ahead: Interpreters kept started for the next sessions and resets (see
            :mod:`coding_gym.server.ahead`); 0 for none.
    """

    def __init__(self, limits: Limits, max_sessions: int, idle_timeout_s: float,
                 start_ahead: int = 1) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
        if idle_timeout_s <= 0:
            raise ValueError(f"idle_timeout_s must be positive, got {idle_timeout_s}")
        self.limits = limits
        self.max_sessions = max_sessions
        self.idle_timeout_s = idle_timeout_s
        self._sessions: dict[str, Session] = {}
        self._pool = ThreadPoolExecutor(max_sessions, thread_name_prefix="coding-gym-session")
        self._reaper: asyncio.Task[None] | None = None
        self._slot_freed = asyncio.Condition()
        #: Interpreters being started ahead for sessions whose last step killed theirs.
        self._replacing: set[asyncio.Task[None]] = set()
        #: Stateless steps' sessions being closed after their reply.
        self._closing: set[asyncio.Task[None]] = set()
        self._ahead = InterpreterAhead(limits, start_ahead)

    @property
    def ready_ahead(self) -> int:
        """Interpreters started ahead and ready to be taken."""
        return self._ahead.ready

    @property
    def active(self) -> int:
        """Sessions holding a slot, including those still closing."""
        return len(self._sessions)

    async def open(self) -> Session:
        """A new session (its interpreter starts on first use), or :class:`CapacityReached`.

        At capacity, it waits (up to :data:`CLOSING_WAIT_S`) while sessions whose client has
        left are still closing: a client that closes one session and opens the next at once
        would otherwise be turned away by its own old session.
        """
        if self._waiting_for_a_slot():
            async with self._slot_freed:
                try:
                    await asyncio.wait_for(
                        self._slot_freed.wait_for(lambda: not self._waiting_for_a_slot()),
                        CLOSING_WAIT_S)
                except asyncio.TimeoutError:
                    pass
        if len(self._sessions) >= self.max_sessions:
            raise CapacityReached(self.max_sessions)
        session = Session(secrets.token_urlsafe(18), self.limits, await self._ahead.take())
        self._sessions[session.id] = session
        return session

    def _waiting_for_a_slot(self) -> bool:
        """Every slot is taken, and some will be free once their session has closed."""
        return (len(self._sessions) >= self.max_sessions
                and any(s.closing for s in self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        """The open session with this id, if any."""
        return self._sessions.get(session_id)

    def sessions(self) -> list[Session]:
        """Every session holding a slot."""
        return list(self._sessions.values())

    async def call(self, session: Session, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` (a blocking session method) in the pool, one call at a time."""
        async with self._turn(session):
            return await self._in_pool(session, partial(fn, *args))

    async def _in_pool(self, session: Session, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a thread of the pool, in the session's turn: the loop stops
        watching the worker first, as the thread may close its fds."""
        session.watch.stop()
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn)

    async def reset(self, session: Session, seed: int | None = None,
                    episode_id: str | None = None) -> dict[str, Any]:
        """:meth:`Session.reset`: on the interpreter started ahead if one is ready (the
        session's own, if it ran code, is then closed in the background), else in the pool."""
        async with self._turn(session):
            if not session.fresh:
                backend = await self._ahead.take()
                if backend is not None:
                    self._ahead.close_soon(session.swap(backend))
            if session.fresh:
                return session.reset(seed, episode_id)  # no interpreter to start: no wait
            return await self._in_pool(session, partial(session.reset, seed, episode_id))

    async def step(self, session: Session, code: str,
                   timeout_s: float | None = None) -> dict[str, Any]:
        """:meth:`Session.step`, with the reply read on the event loop when it can be.

        Its time limit counts from when it was asked for, or from the end of the client's
        previous call if that came later: waiting for a new interpreter in place of the one
        the last step killed uses it up too, so that the reply comes within it.
        """
        arrived = time.monotonic()
        limit_s = session.limit_s(timeout_s)
        if not await self._step_turn(session, arrived, limit_s):
            now = time.monotonic()
            result = steps.unstarted(limit_s, now - max(arrived, session.answered_at))
            session.answered_at = now
            return session.record(result)
        try:
            asked_at = max(arrived, session.answered_at)
            if session.episode_id is None and session.fresh:
                session.reset()  # its interpreter was started ahead: a new episode id only
            backend = session.backend
            if session.episode_id is None or not stepping.ready_on_loop(backend, code):
                reply = await self._in_pool(session, partial(session.step, code, timeout_s,
                                                             asked_at))
            else:
                reply = session.record(await stepping.drive(
                    backend, code, limit_s, self._pool, session.watch, asked_at))
        finally:
            _end_turn(session, client=True)
        if reply["info"].get("state_lost"):
            # The step killed the interpreter: start its successor while the reply travels.
            task = asyncio.get_running_loop().create_task(self._replace(session))
            self._replacing.add(task)
            task.add_done_callback(self._replacing.discard)
        return reply

    @staticmethod
    async def _step_turn(session: Session, arrived: float, limit_s: float) -> bool:
        """Take the session's turn for a step asked for at ``arrived``; False if its time
        limit runs out first, while the server holds the turn to replace a killed
        interpreter. Waiting for the client's own earlier calls does not count."""
        lock = session.lock
        if not lock.locked():
            await lock.acquire()  # free: no wait to bound
        else:
            while True:
                started = max(arrived, session.answered_at)
                # While a call of the client holds the turn, the limit has not started: look
                # again now and then.
                bound = (_CLIENT_CALL_POLL_S if session.serving_client
                         else max(started + limit_s - time.monotonic(), 1e-3))
                try:
                    await asyncio.wait_for(lock.acquire(), bound)
                    break
                except asyncio.TimeoutError:
                    if not session.serving_client and session.answered_at <= started:
                        return False
        _begin_turn(session, client=True)
        return True

    async def _replace(self, session: Session) -> None:
        """Start the interpreter of a session whose last step killed it, in its turn."""
        async with _Turn(session, client=False):
            if session.closing or session.id not in self._sessions:
                return
            try:
                await self._in_pool(session, session.backend.prepare)
            except Exception as e:  # noqa: BLE001 - the next step starts it, or says why not
                logger.info("session %s: no interpreter ready ahead: %s", session.id[:8], e)

    def _turn(self, session: Session) -> _Turn:
        """The session's turn to run a call: one at a time, in order."""
        return _Turn(session)

    async def interrupt(self, session: Session) -> None:
        """Kill the session's running interpreter, without waiting for its call to return."""
        # Not in the pool: the session's own call may hold the thread it would need.
        await asyncio.to_thread(session.interrupt)

    async def close(self, session: Session) -> None:
        """Close the session once its current call is over; its slot is free on return."""
        if session.id not in self._sessions:
            return
        session.closing = True
        try:
            await self.call(session, session.close)
        finally:
            self._sessions.pop(session.id, None)
            async with self._slot_freed:
                self._slot_freed.notify_all()

    def close_soon(self, session: Session) -> None:
        """:meth:`close` in the background (:meth:`shutdown` waits for it)."""
        task = asyncio.get_running_loop().create_task(self.close(session))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def start(self) -> None:
        """Start the background work, from a running event loop: closing idle sessions, and
        the interpreters ahead."""
        self._ahead.fill()
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap_forever())

    async def _reap_forever(self) -> None:
        interval_s = min(self.idle_timeout_s / 4, 5.0)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reap_idle()
            except Exception:
                logger.exception("reaping idle sessions failed")

    async def reap_idle(self) -> None:
        """Close every session idle for longer than ``idle_timeout_s``."""
        now = time.monotonic()
        idle = [s for s in self.sessions()
                if not s.busy and not s.lock.locked()
                and now - s.last_active > self.idle_timeout_s]
        for session in idle:
            logger.info("closing session %s: idle for %.0f s", session.id[:8],
                        now - session.last_active)
            if session.on_expire is not None:
                await session.on_expire()
            await self.close(session)

    async def shutdown(self) -> None:
        """Stop reaping and close every session."""
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        sessions = self.sessions()
        for session in sessions:
            await self.interrupt(session)
        await asyncio.gather(*(self.close(s) for s in sessions), *self._closing,
                             return_exceptions=True)
        await self._ahead.stop()
        self._pool.shutdown(wait=False)
