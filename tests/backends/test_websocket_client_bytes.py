"""BlockingWebSocket against a server written byte by byte, so that tests choose exactly what
the client reads, and when: framing, reads split anywhere, protocol errors."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from websockets.exceptions import ConnectionClosed

from coding_gym.backends.websocket_client import BlockingWebSocket
from tests.servers import wait_for
from tests.wsbytes import BINARY, CLOSE, CONT, PING, PONG, TEXT, frame

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3


@contextmanager
def raw_server(script: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback server running ``script`` on its one connection; its URL. What the script
    raises fails the test."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            connection, _ = listener.accept()
            with connection:
                connection.settimeout(10)
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                script(connection)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"ws://127.0.0.1:{listener.getsockname()[1]}/ws"
    finally:
        thread.join(10)
        listener.close()
    if errors:
        raise errors[0]


def accept(connection: socket.socket, then: bytes = b"") -> None:
    """Read the opening handshake and accept it; ``then`` goes out in the same write."""
    request = b""
    while not request.endswith(b"\r\n\r\n"):
        request += connection.recv(1)
    key = re.search(rb"(?i)sec-websocket-key: *(\S+)", request)
    assert key is not None, request
    answer = base64.b64encode(hashlib.sha1(key[1] + _ACCEPT_GUID).digest())
    connection.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                       b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + answer
                       + b"\r\n\r\n" + then)


def read_frame(connection: socket.socket) -> tuple[int, bytes, int]:
    """The client's next frame: opcode, unmasked payload, and the 7-bit length field."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = connection.recv(n - len(data))
            assert chunk, "the client closed the connection mid-frame"
            data += chunk
        return data

    head, second = exactly(2)
    assert head & 0x80 and not head & 0x70, f"not a final frame without RSV bits: {head:#x}"
    assert second & 0x80, "a client frame must be masked"
    length = size = second & 0x7F
    if length >= 126:
        size = int.from_bytes(exactly(2 if length == 126 else 8), "big")
    mask = exactly(4)
    payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(exactly(size)))
    return head & 0x0F, payload, length


def close_payload(code: int, reason: str = "") -> bytes:
    return code.to_bytes(2, "big") + reason.encode()


@pytest.mark.parametrize(("size", "length_field"),
                         [(0, 0), (125, 125), (126, 126), (65535, 126), (65536, 127)])
def test_sent_frames_are_masked_with_the_shortest_length_header(size, length_field):
    received = []

    def read_one(connection: socket.socket) -> None:
        accept(connection)
        received.append(read_frame(connection))

    with raw_server(read_one) as url:
        ws = BlockingWebSocket(url)
        ws.send("é" * (size // 2) + "x" * (size % 2))
        wait_for(lambda: received)
        ws.close(0.1)
    assert received == [(TEXT, ("é" * (size // 2) + "x" * (size % 2)).encode(), length_field)]


def test_frames_in_the_same_read_as_the_handshake_response_are_kept():
    second = frame(TEXT, "é" * 150)  # a 2-byte extended length: cut inside it below

    def eager(connection: socket.socket) -> None:
        accept(connection, then=frame(TEXT, "first") + second[:3])
        assert read_frame(connection)[:2] == (TEXT, b"got it")
        connection.sendall(second[3:])
        read_frame(connection)

    with raw_server(eager) as url:
        ws = BlockingWebSocket(url)
        assert ws.recv(10) == "first"
        ws.send("got it")
        assert ws.recv(10) == "é" * 150
        ws.close(0.1)


def test_a_message_split_into_single_bytes_is_put_back_together():
    pongs = []
    # Fragments, a ping between them, multi-byte characters cut in two: one byte per read.
    message = "ü" * 100 + "€" * 50
    data = (frame(TEXT, message.encode()[:101], fin=False) + frame(PING, b"still there?")
            + frame(CONT, message.encode()[101:]))

    def trickle(connection: socket.socket) -> None:
        accept(connection)
        for i in range(len(data)):
            connection.sendall(data[i:i + 1])
            time.sleep(0.001)
        pongs.append(read_frame(connection)[:2])

    with raw_server(trickle) as url:
        ws = BlockingWebSocket(url)
        assert ws.recv(10) == message
        wait_for(lambda: pongs)
        ws.close(0.1)
    assert pongs == [(PONG, b"still there?")]


def test_fragments_are_joined_and_a_ping_between_them_is_answered_with_its_payload():
    client_frames = []

    def fragments(connection: socket.socket) -> None:
        accept(connection, then=frame(TEXT, "one ", fin=False) + frame(PING, b"\x00ping")
               + frame(CONT, "two ", fin=False) + frame(CONT, "three")
               + frame(BINARY, b"\x00", fin=False) + frame(CONT, b"\x01"))
        client_frames.append(read_frame(connection)[:2])

    with raw_server(fragments) as url:
        ws = BlockingWebSocket(url)
        assert ws.recv(10) == "one two three"
        assert ws.recv(10) == b"\x00\x01"
        wait_for(lambda: client_frames)
        ws.close(0.1)
    assert client_frames == [(PONG, b"\x00ping")]


def test_a_close_from_the_server_is_echoed_and_its_code_and_reason_raised():
    echoes = []

    def close_with_reason(connection: socket.socket) -> None:
        accept(connection, then=frame(TEXT, "why") + frame(PONG, b"unasked")
               + frame(CLOSE, close_payload(4401, "missing or wrong token"))
               + frame(TEXT, "never read"))
        echoes.append(read_frame(connection)[:2])

    with raw_server(close_with_reason) as url:
        ws = BlockingWebSocket(url)
        wait_for(lambda: echoes)
        assert not ws.open
        assert ws.recv(10) == "why"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        ws.close()
    assert echoes == [(CLOSE, close_payload(4401, "missing or wrong token"))]
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401,
                                                                 "missing or wrong token")
    assert closed.value.sent.code == 4401 and closed.value.rcvd_then_sent is True


def test_the_end_of_the_stream_without_a_close_frame_closes_the_connection():
    with raw_server(accept) as url:
        ws = BlockingWebSocket(url)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        ws.close()
    assert (closed.value.rcvd, closed.value.sent) == (None, None)


@pytest.mark.parametrize("frames", [
    [frame(TEXT, "z" * 1001)],
    [frame(TEXT, "z" * 600, fin=False), frame(CONT, "z" * 401)],
], ids=["one frame", "fragments"])
def test_a_message_over_max_size_is_refused_with_1009_before_its_end_arrives(frames):
    sent = []

    def oversize(connection: socket.socket) -> None:
        # Only the header of the last frame: the client must not wait for its payload.
        accept(connection, then=frame(TEXT, "small") + b"".join(frames)[:-400])
        sent.append(read_frame(connection)[:2])

    with raw_server(oversize) as url:
        ws = BlockingWebSocket(url, max_size=1000)
        assert ws.recv(10) == "small"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        ws.close()
    assert closed.value.sent.code == 1009
    assert sent == [(CLOSE, close_payload(1009, "message over 1000 bytes"))]


@pytest.mark.parametrize(("bad_frame", "code"), [
    (frame(TEXT, "masked", mask=b"\x01\x02\x03\x04"), 1002),
    (frame(TEXT, "compressed?", rsv=0x40), 1002),
    (frame(0x3, "reserved opcode"), 1002),
    (frame(CONT, "no message to continue"), 1002),
    (frame(TEXT, "first", fin=False) + frame(TEXT, "not a continuation"), 1002),
    (frame(PING, b"p" * 126), 1002),
    (frame(PING, b"fragmented", fin=False), 1002),
    (frame(CLOSE, b"\x03"), 1002),
    (frame(TEXT, b"caf\xe9"), 1007),
    (frame(TEXT, b"\xe2\x82", fin=False) + frame(CONT, b"!"), 1007),
], ids=["masked", "rsv1", "opcode 3", "stray continuation", "interrupted message",
        "long ping", "fragmented ping", "short close", "latin-1 text", "split bad utf-8"])
def test_a_frame_breaking_the_protocol_fails_the_connection(bad_frame, code):
    sent = []

    def misbehave(connection: socket.socket) -> None:
        accept(connection, then=frame(TEXT, "before") + bad_frame)
        sent.append(read_frame(connection)[:2])

    with raw_server(misbehave) as url:
        ws = BlockingWebSocket(url)
        assert ws.recv(10) == "before"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        with pytest.raises(ConnectionClosed):
            ws.send("too late")
        ws.close()
    assert closed.value.sent.code == code and closed.value.rcvd is None
    assert sent[0][0] == CLOSE and int.from_bytes(sent[0][1][:2], "big") == code
