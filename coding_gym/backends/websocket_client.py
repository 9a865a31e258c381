"""``BlockingWebSocket``: a client WebSocket that reads in the caller's thread.

websockets' own blocking client (``websockets.sync``) reads the socket in a thread of its
own, so every reply crosses from that thread to the caller's: on loopback, that hand-off was
about 85 µs of a 190 µs echo round trip. Here the caller reads, through websockets' sans-I/O
protocol, only when it waits for a reply. Frames that arrive between two requests (pings, a
close) are handled at the next read, or when :attr:`BlockingWebSocket.open` looks.

Neither compression nor proxies: the connection goes straight to the server, and
messages travel as they are.
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from collections import deque
from collections.abc import Mapping

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import USER_AGENT, Response
from websockets.protocol import State
from websockets.uri import parse_uri

_CHUNK = 1 << 16


class BlockingWebSocket:
    """One client WebSocket connection; every method blocks, none starts a thread.

    Args:
        url: ``ws://`` or ``wss://`` URL.
        headers: Extra headers of the opening handshake.
        open_timeout_s: Time allowed to connect and complete the handshake.
        max_size: Largest message accepted; a larger one fails the connection (code 1009).

    Raises (from the constructor): ``OSError`` when the server cannot be reached,
    ``TimeoutError``, or ``websockets.exceptions.InvalidHandshake`` (``InvalidStatus`` when
    the server answers the handshake with an HTTP error).
    """

    def __init__(self, url: str, *, headers: Mapping[str, str] | None = None,
                 open_timeout_s: float = 10.0, max_size: int | None = 1 << 20) -> None:
        uri = parse_uri(url)
        deadline = time.monotonic() + open_timeout_s
        sock = socket.create_connection((uri.host, uri.port), timeout=open_timeout_s)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if uri.secure:
                sock = ssl.create_default_context().wrap_socket(sock, server_hostname=uri.host)
            self._sock = sock
            self._poller = select.poll()
            self._poller.register(sock, select.POLLIN)
            # No permessage-deflate: compressing and inflating each message on both ends
            # cost 30-40 µs of a 150 µs loopback round trip, for replies mostly far below a
            # kilobyte (and stdout and stderr of at most Limits.max_output_bytes).
            self._protocol = ClientProtocol(uri, max_size=max_size)
            self._messages: deque[str | bytes] = deque()
            self._fragments: list[bytes] = []
            self._text = True
            self._response: Response | None = None
            self._handshake(headers or {}, deadline)
            sock.settimeout(None)  # a send waits for room in the buffer, however long
        except BaseException:
            sock.close()
            raise

    def _handshake(self, headers: Mapping[str, str], deadline: float) -> None:
        request = self._protocol.connect()
        request.headers.update(headers)
        request.headers.setdefault("User-Agent", USER_AGENT)
        self._protocol.send_request(request)
        self._flush()
        while self._response is None and self._protocol.state is State.CONNECTING:
            if not self._read(deadline - time.monotonic()):
                raise TimeoutError("timed out while waiting for the handshake response")
        if self._protocol.handshake_exc is not None:
            raise self._protocol.handshake_exc

    @property
    def open(self) -> bool:
        """True while the connection is open, as far as what the server sent so far says."""
        if self._protocol.state is State.OPEN and self._readable():
            self._read(0.0)
        return self._protocol.state is State.OPEN

    def _readable(self) -> bool:
        """Bytes are waiting, in the socket or decrypted in the TLS layer; no read is tried
        (the check runs before every request: a failing read costs 4 µs, a poll 1 µs)."""
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        return bool(self._poller.poll(0))

    def send(self, text: str) -> None:
        """Send one text message; ``ConnectionClosed`` if the connection is closed."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_text(text.encode())
            try:
                self._flush()
                return
            except OSError:
                self._read(0.0)  # what the server said before it closed, if anything
                self._end_of_stream()
        raise self._closed()

    def recv(self, timeout_s: float) -> str | bytes:
        """The next message, received and not yet returned; ``TimeoutError`` when none
        comes within ``timeout_s``, ``ConnectionClosed`` once the connection is closed.

        Messages that arrived before the connection closed are returned first.
        """
        deadline = time.monotonic() + timeout_s
        while not self._messages:
            if self._protocol.state is State.CLOSED:
                raise self._closed()
            if not self._read(deadline - time.monotonic()):
                raise TimeoutError(f"no message within {timeout_s:g} s")
        return self._messages.popleft()

    def close(self, timeout_s: float = 2.0) -> None:
        """Close: the closing handshake (up to ``timeout_s``), then the socket."""
        try:
            if self._protocol.state is State.OPEN:
                self._protocol.send_close(1000)
                self._flush()
            deadline = time.monotonic() + timeout_s
            while self._protocol.state is not State.CLOSED:
                if not self._read(deadline - time.monotonic()):
                    break
        except OSError:
            pass
        finally:
            self._sock.close()

    def _closed(self) -> ConnectionClosed:
        if self._protocol.state is not State.CLOSED:
            self._end_of_stream()
        return self._protocol.close_exc

    def _read(self, timeout_s: float) -> bool:
        """Read once (waiting up to ``timeout_s``) and handle what came; False on a timeout.

        The end of the stream, or a connection reset, closes the connection.
        """
        sock = self._sock
        if isinstance(sock, ssl.SSLSocket):
            # A TLS record may arrive in pieces: the socket's timeout bounds the whole read.
            sock.settimeout(max(timeout_s, 0.0))
        elif not self._poller.poll(max(timeout_s, 0.0) * 1000):
            # A plain socket stays blocking and waits in poll: switching it between blocking
            # and not costs a system call each way, twice per request.
            return False
        try:
            data = sock.recv(_CHUNK)
        except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
            return False
        except OSError:
            data = b""
        if not data:
            self._end_of_stream()
            return True
        self._protocol.receive_data(data)
        self._take_events()
        self._flush()  # pongs, and the reply to a close
        return True

    def _end_of_stream(self) -> None:
        self._protocol.receive_eof()
        self._take_events()
        try:
            self._flush()
        except OSError:
            pass

    def _take_events(self) -> None:
        for event in self._protocol.events_received():
            if isinstance(event, Response):
                self._response = event
            elif isinstance(event, Frame):
                self._take_frame(event)

    def _take_frame(self, frame: Frame) -> None:
        """Keep data frames (whole messages, or fragments until the last); the protocol
        answers control frames itself."""
        if frame.opcode not in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
            return
        if frame.opcode is not Opcode.CONT:
            self._text = frame.opcode is Opcode.TEXT
            self._fragments = []
        self._fragments.append(bytes(frame.data))
        if frame.fin:
            data = b"".join(self._fragments)
            self._messages.append(data.decode() if self._text else data)
            self._fragments = []

    def _flush(self) -> None:
        if isinstance(self._sock, ssl.SSLSocket):
            self._sock.settimeout(None)  # a send waits for room in the buffer, however long
        for data in self._protocol.data_to_send():
            if data:
                self._sock.sendall(data)
            elif self._sock.fileno() >= 0:
                try:
                    self._sock.shutdown(socket.SHUT_WR)  # the protocol's end of stream
                except OSError:
                    pass
