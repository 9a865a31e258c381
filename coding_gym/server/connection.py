"""One WebSocket client: its session, its requests answered one by one, in order.

Frames are read by a task of their own while a step runs, so a client that disconnects
mid-step is noticed at once: its interpreter is killed and its slot freed, instead of both
being held until the code finishes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from coding_gym.errors import BackendError
from coding_gym.server import protocol
from coding_gym.server.sessions import Session, SessionManager

logger = logging.getLogger(__name__)

#: Requests read ahead while one runs; beyond that, reading waits (back-pressure).
_MAX_PENDING = 64
CLOSE_NORMAL = 1000


class Connection:
    """Serves one accepted WebSocket with one session until either side ends it."""

    def __init__(self, websocket: WebSocket, session: Session, manager: SessionManager,
                 max_message_bytes: int) -> None:
        self.websocket = websocket
        self.session = session
        self.manager = manager
        self.max_message_bytes = max_message_bytes
        self._frames: asyncio.Queue[str | bytes | None] = asyncio.Queue(_MAX_PENDING)
        self._gone = False
        session.on_expire = self._expire

    async def serve(self) -> None:
        reader = asyncio.get_running_loop().create_task(self._read_frames())
        try:
            while not self._gone:
                frame = await self._frames.get()
                if frame is None or self._gone:
                    break
                reply = await self._answer(frame)
                if reply is None:
                    await self._close(CLOSE_NORMAL, "closed by the client")
                    break
                if not await self._send(reply):
                    break
        finally:
            reader.cancel()
            await self.manager.close(self.session)

    async def _read_frames(self) -> None:
        try:
            while True:
                message = await self.websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                frame = message.get("text")
                await self._frames.put(frame if frame is not None else message.get("bytes", b""))
        except (WebSocketDisconnect, RuntimeError):
            pass
        self._gone = True
        try:
            self._frames.put_nowait(None)  # wake the request loop if it waits for a frame
        except asyncio.QueueFull:
            pass  # it is busy, and checks _gone before the next request
        # The client left: kill a step still running for it rather than let it finish; its
        # slot is as good as free (a client reconnecting at capacity may wait for it).
        self.session.closing = True
        await self.manager.interrupt(self.session)

    async def _answer(self, frame: str | bytes) -> dict[str, Any] | None:
        """The reply to one frame; None for a close request."""
        try:
            message = protocol.parse_message(frame, self.max_message_bytes)
        except protocol.ProtocolError as e:
            return e.reply()
        except Exception as e:  # whatever a message holds, it must not end the session
            logger.exception("session %s: unreadable message", self.session.id[:8])
            return protocol.error_reply(f"unreadable message: {type(e).__name__}: {e}",
                                        protocol.VALIDATION_ERROR)
        if isinstance(message, protocol.CloseMessage):
            return None
        if isinstance(message, protocol.StateMessage):
            return protocol.state_reply(self.session.state())
        try:
            if isinstance(message, protocol.ResetMessage):
                data = await self.manager.call(self.session, self.session.reset,
                                               message.data.seed, message.data.episode_id)
            else:
                data = await self.manager.step(self.session, message.data.code,
                                               message.timeout_s)
        except BackendError as e:
            return protocol.error_reply(f"the server could not run the request: {e}",
                                        protocol.EXECUTION_ERROR)
        except Exception as e:
            logger.exception("session %s: %s request failed", self.session.id[:8], message.type)
            return protocol.error_reply(f"internal error: {type(e).__name__}: {e}",
                                        protocol.EXECUTION_ERROR)
        return protocol.observation_reply(data)

    async def _send(self, reply: dict[str, Any]) -> bool:
        try:
            await self.websocket.send_text(json.dumps(reply))
        except (WebSocketDisconnect, RuntimeError, OSError):
            self._gone = True
            return False
        return True

    async def _close(self, code: int, reason: str) -> None:
        try:
            await self.websocket.close(code=code, reason=reason)
        except (RuntimeError, OSError):
            pass

    async def _expire(self) -> None:
        idle_s = self.manager.idle_timeout_s
        await self._close(CLOSE_NORMAL, f"session idle for more than {idle_s:g} s")
