"""uvicorn's WebSocket protocol, with the frames of an open connection's data read and
written here.

A session's messages are small and whole: a step and its reply, each in one frame. uvicorn
hands every byte to websockets' sans-I/O parser (generators, events, a frame object per
message), pauses the socket's reading after every message and resumes it at the next
``receive`` (two changes to the event loop's poller each time), and frames every reply
through the same machinery. Here a whole, unfragmented text or binary frame of an open
connection is unmasked and queued for the app directly, and a text reply is framed
directly; reading pauses only when the app falls :data:`READ_AHEAD` messages behind. An app
that finds the protocol in its scope's extensions (:data:`EXTENSION`) may take those
messages by a call and write its replies the same way, without the ASGI events and the
turns of the event loop they cost.

Everything else (the handshake, control frames, fragments, oversized or invalid frames,
closing) still goes through uvicorn and websockets, which see only whole frames, so their
parser is always at a frame boundary. The first frame the direct path does not take
switches the connection to uvicorn's path for good, if it could leave the parser mid-message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State

from coding_gym.wsframes import BINARY, MASK, TEXT, apply_mask, header, read_header

#: Messages queued for the app before reading pauses.
READ_AHEAD = 16
#: How long a connection refused for a bad frame waits for the client to close it.
LINGER_S = 10.0
#: The key of the ASGI scope's ``extensions`` under which the protocol offers itself, for
#: :meth:`DirectFramesProtocol.deliver_to` and :meth:`DirectFramesProtocol.send_text_now`.
EXTENSION = "coding_gym.direct_frames"

#: What uvicorn's protocol must have for the direct paths to stand in for its own (a
#: release without them keeps uvicorn's paths throughout).
_NEEDED = ("conn", "queue", "transport", "handshake_complete", "close_sent", "disconnected",
           "initial_response", "read_paused", "writable", "config")


def split_frame(data: bytes | bytearray, start: int) -> tuple[int, int, int, int] | None:
    """Where the frame at ``data[start:]`` is: (first header byte, payload start, payload
    end, mask start), or None while it is incomplete. The mask start is -1 for an unmasked
    frame."""
    found = read_header(data, start)
    if found is None:
        return None
    first, second, length, at = found
    mask = -1
    if second & MASK:
        mask, at = at, at + 4
    end = at + length
    return (first, at, end, mask) if end <= len(data) else None


class DirectFramesProtocol(WebSocketsSansIOProtocol):
    """:class:`WebSocketsSansIOProtocol` with the data frames of an open connection read
    and written directly (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._direct = all(hasattr(self, name) for name in _NEEDED) and hasattr(
            getattr(self.conn, "reader", None), "buffer")
        self._requested = False
        #: Bytes of a frame not yet whole, kept until the rest arrives.
        self._partial = bytearray()
        self._max_size: int = self.config.ws_max_size or 1 << 62
        self._consumer: Callable[[str | bytes], bool] | None = None
        self._consumer_full = False
        #: A bad frame was refused: what still comes is read and dropped.
        self._lingering = False

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        if not self.handshake_complete:
            # The first call brings the opening request; anything more arrived before
            # the handshake ended and may leave websockets' parser mid-frame.
            self._direct = self._direct and not self._requested
            self._requested = True
        if not self._reading_directly():
            super().data_received(data)
            return
        if self._partial:
            self._partial += data
            data, self._partial = bytes(self._partial), bytearray()
        start, size = 0, len(data)
        while start < size and self._reading_directly():
            where = split_frame(data, start)
            if where is None:
                found = read_header(data, start)
                if found is None or found[2] <= self._max_size:
                    self._partial += data[start:]
                    start = size
                break  # else its header says it is too large: websockets says so, at once
            end = where[2]
            if not self._take(data, where):
                # A control frame leaves websockets' parser between messages; anything
                # else may not, so the rest of the connection goes its way.
                self._direct = self._direct and 0x88 <= where[0] <= 0x8A
                super().data_received(data[start:end])
            start = end
        if start < size:
            self._direct = False
            super().data_received(data[start:])
        if not self.read_paused and (self._consumer_full or self.queue.qsize() >= READ_AHEAD):
            self.read_paused = True
            self.transport.pause_reading()

    @property
    def direct(self) -> bool:
        """True while whole data frames are still read directly."""
        return self._direct

    def _reading_directly(self) -> bool:
        return (self._direct and self.handshake_complete and not self.close_sent
                and self.initial_response is None and not self.disconnected
                and self.conn.state is State.OPEN and not self.conn.reader.buffer)

    def _take(self, data: bytes, where: tuple[int, int, int, int]) -> bool:
        """Queue the message of a whole data frame for the app; False for any other."""
        first, at, end, mask = where
        opcode = first & 0x0F
        if first & 0xF0 != 0x80 or mask < 0 or opcode not in (TEXT, BINARY) \
                or end - at > self._max_size:
            return False
        payload = apply_mask(data[at:end], data[mask:mask + 4])
        if opcode == BINARY:
            self._hand_over(payload, {"type": "websocket.receive", "bytes": payload})
            return True
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            return False  # websockets closes with 1007
        self._hand_over(text, {"type": "websocket.receive", "text": text})
        return True

    def _hand_over(self, message: str | bytes, event: Any) -> None:
        if self._consumer is not None:
            self._consumer_full = not self._consumer(message)
        else:
            self.queue.put_nowait(event)

    def deliver_to(self, consumer: Callable[[str | bytes], bool] | None) -> None:
        """From now on, call ``consumer`` with each message read directly, instead of
        queueing it for ``receive`` (which still brings everything else: messages through
        uvicorn's path, the disconnect); None queues them again. ``consumer`` returns False
        when it wants no more for now: reading pauses until :meth:`read_more`."""
        self._consumer = consumer

    def read_more(self) -> None:
        """The consumer of :meth:`deliver_to` has room again."""
        self._consumer_full = False
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            self.transport.resume_reading()

    def send_text_now(self, text: str) -> bool:
        """Write ``text`` as one message if the direct path may; False if ``send`` must."""
        if (not self._direct or not self.handshake_complete or self.close_sent
                or self.disconnected or self.initial_response is not None
                or not self.writable.is_set() or self.conn.state is not State.OPEN):
            return False
        payload = text.encode()
        self.transport.write(header(TEXT, len(payload)) + payload)
        return True

    async def send(self, message: Any) -> None:
        text = message.get("text") if message["type"] == "websocket.send" else None
        if text is None or not self.send_text_now(text):
            await super().send(message)

    def handle_parser_exception(self) -> None:
        """A frame was refused (too large, invalid, breaking the protocol): send the close
        frame that says why, as uvicorn does, but keep the connection until the client
        closes it. uvicorn closes it at once, and a client still sending the rest of a
        large frame then gets a reset, which can destroy the close frame and its code before
        the client reads them."""
        if self._lingering:
            return
        self._lingering = True
        close = self.conn.close_sent
        assert close is not None
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code,
                               "reason": close.reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        if self.read_paused:
            self.read_paused = False
            self.transport.resume_reading()  # to drop what comes, up to the client's end
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.close_timer is None:
            self.close_timer = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if self._direct and scope is not None:
            # The app's task starts at the next turn of the loop: it finds this there.
            scope["extensions"][EXTENSION] = self
