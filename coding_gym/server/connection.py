"""One WebSocket client: its session, its requests answered one by one, in order.

Frames are read by a task of their own while a step runs, so a client that disconnects
mid-step is noticed at once: its interpreter is killed and its slot freed, instead of both
being held until the code finishes.

The connection speaks ASGI directly (``receive`` and ``send``) once the route has accepted
the WebSocket: through Starlette's ``WebSocket`` wrapper and FastAPI's route, which check and
wrap every message, an echo round trip took 153 µs, against 134 µs without them. Under
``coding-gym serve`` the server's protocol hands messages over by a call and takes replies
the same way (``wsprotocol.py``); the ASGI events remain for the rest (and other servers).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any

from starlette.types import Receive, Send

from coding_gym import jsontext
from coding_gym.errors import BackendError
from coding_gym.server import protocol
from coding_gym.server.session import Session
from coding_gym.server.sessions import SessionManager
from coding_gym.server.wsprotocol import DirectFramesProtocol

logger = logging.getLogger(__name__)

#: Requests read ahead while one runs; beyond that, reading waits (back-pressure).
_MAX_PENDING = 64
CLOSE_NORMAL = 1000


class Connection:
    """Serves one accepted WebSocket with one session until either side ends it."""

    def __init__(self, receive: Receive, send: Send, session: Session,
                 manager: SessionManager, max_message_bytes: int,
                 frames: DirectFramesProtocol | None = None) -> None:
        self.receive = receive
        self.send = send
        #: The server's protocol, where it hands messages over and writes replies directly
        #: (see wsprotocol.py): one turn of the loop less per request.
        self._direct = frames
        self.session = session
        self.manager = manager
        self.max_message_bytes = max_message_bytes
        #: Frames read and not yet answered.
        self._frames: deque[str | bytes] = deque()
        #: The request loop's wait for a frame, and the reader's for room in _frames. One
        #: each: a side woken but not yet run must not take the other's wait with it.
        self._frame_wait = _Wakeup()
        self._room_wait = _Wakeup()
        self._gone = False
        self._closed = False
        session.on_expire = self._expire

    async def serve(self) -> None:
        if self._direct is not None:
            self._direct.deliver_to(self._take)
        reader = asyncio.get_running_loop().create_task(self._read_frames())
        try:
            while True:
                frame = await self._next_frame()
                if frame is None:
                    break
                reply = await self._answer(frame)
                if reply is None:
                    await self._close(CLOSE_NORMAL, "closed by the client")
                    break
                if not await self._send(reply):
                    break
        finally:
            reader.cancel()
            if self._direct is not None:
                self._direct.deliver_to(None)
            await self.manager.close(self.session)

    async def _next_frame(self) -> str | bytes | None:
        """The next frame to answer; None once the client is gone."""
        frames = self._frames
        while not frames:
            if self._gone:
                return None
            await self._frame_wait.wait()
        if len(frames) == _MAX_PENDING:
            self._room_wait.wake()  # the reader may be waiting for room
            if self._direct is not None:
                self._direct.read_more()
        return None if self._gone else frames.popleft()

    def _take(self, frame: str | bytes) -> bool:
        """A message handed over by the server's protocol; False once enough are waiting."""
        self._frames.append(frame)
        self._frame_wait.wake()
        return len(self._frames) < _MAX_PENDING

    async def _read_frames(self) -> None:
        frames = self._frames
        try:
            while True:
                message = await self.receive()
                if message["type"] != "websocket.receive":
                    break  # websocket.disconnect
                text = message.get("text")
                frames.append(text if text is not None else message.get("bytes") or b"")
                self._frame_wait.wake()
                while len(frames) >= _MAX_PENDING and not self._gone:
                    await self._room_wait.wait()
        except (OSError, RuntimeError):
            pass  # the server itself shuts the connection
        self._gone = True
        self._frame_wait.wake()
        # The client left: kill a step still running for it rather than let it finish; its
        # slot is as good as free (a client reconnecting at capacity may wait for it).
        self.session.closing = True
        await self.manager.interrupt(self.session)

    async def _answer(self, frame: str | bytes) -> dict[str, Any] | None:
        """The reply to one frame; None for a close request."""
        try:
            request = protocol.parse_message(frame, self.max_message_bytes)
        except protocol.ProtocolError as e:
            return e.reply()
        except Exception as e:  # whatever a message holds, it must not end the session
            logger.exception("session %s: unreadable message", self.session.id[:8])
            return protocol.error_reply(f"unreadable message: {type(e).__name__}: {e}",
                                        protocol.VALIDATION_ERROR)
        kind = request.type
        session = self.session
        try:
            if kind == "step":
                data = await self.manager.step(session, request.code, request.timeout_s)
            elif kind == "reset":
                data = await self.manager.reset(session, request.seed, request.episode_id)
            elif kind == "state":
                return protocol.state_reply(session.state())
            else:
                return None
        except BackendError as e:
            return protocol.error_reply(f"the server could not run the request: {e}",
                                        protocol.EXECUTION_ERROR)
        except Exception as e:
            logger.exception("session %s: %s request failed", session.id[:8], kind)
            return protocol.error_reply(f"internal error: {type(e).__name__}: {e}",
                                        protocol.EXECUTION_ERROR)
        return protocol.observation_reply(data)

    async def _send(self, reply: dict[str, Any]) -> bool:
        if self._closed:
            return False
        text = jsontext.dumps(reply)
        if self._direct is not None and self._direct.send_text_now(text):
            return True
        try:
            await self.send({"type": "websocket.send", "text": text})
        except (OSError, RuntimeError):
            # uvicorn's ClientDisconnected is an OSError; a send after a close, RuntimeError.
            self._gone = True
            return False
        return True

    async def _close(self, code: int, reason: str) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.send({"type": "websocket.close", "code": code, "reason": reason})
        except (OSError, RuntimeError):
            pass

    async def _expire(self) -> None:
        idle_s = self.manager.idle_timeout_s
        await self._close(CLOSE_NORMAL, f"session idle for more than {idle_s:g} s")


class _Wakeup:
    """One side's wait for the other: a frame to answer, or room for one more."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    async def wait(self) -> None:
        """Wait until :meth:`wake` is called."""
        future = self._future = asyncio.get_running_loop().create_future()
        try:
            await future
        finally:
            if self._future is future:
                self._future = None

    def wake(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)
