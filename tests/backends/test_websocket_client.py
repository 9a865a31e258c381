"""BlockingWebSocket against a websockets server (messages, fragments, pings, closes, refusals)
and against a raw socket server that writes exact bytes (framing, reads split anywhere,
protocol errors)."""

from __future__ import annotations

import base64
import hashlib
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.server import ServerConnection, serve

from coding_gym.backends.websocket_client import BlockingWebSocket
from tests.servers import wait_for


@contextmanager
def server(handler: Callable[[ServerConnection], None], **options) -> Iterator[str]:
    """A websockets server on loopback running ``handler`` per connection; its URL."""
    with serve(handler, "127.0.0.1", 0, **options) as ws_server:
        thread = threading.Thread(target=ws_server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"ws://127.0.0.1:{ws_server.socket.getsockname()[1]}/ws"
        finally:
            ws_server.shutdown()
            thread.join(10)


def echo(ws: ServerConnection) -> None:
    for message in ws:
        ws.send(message)


def test_text_and_binary_messages_come_back_as_sent():
    with server(echo) as url:
        ws = BlockingWebSocket(url)
        ws.send('{"type": "step", "data": {"code": "print(\'é\')"}}')
        assert ws.recv(10) == '{"type": "step", "data": {"code": "print(\'é\')"}}'
        ws.send("x" * 300_000)  # more than one read
        assert ws.recv(10) == "x" * 300_000
        ws.close()


def test_fragments_are_joined_into_one_message():
    def fragments(ws: ServerConnection) -> None:
        ws.recv()
        ws.send(["one ", "two ", "three"])
        ws.send([b"\x00", b"\x01"])
        ws.recv()

    with server(fragments) as url:
        ws = BlockingWebSocket(url)
        ws.send("go")
        assert ws.recv(10) == "one two three"
        assert ws.recv(10) == b"\x00\x01"
        ws.close()


def test_a_recv_timeout_leaves_the_connection_usable():
    with server(echo) as url:
        ws = BlockingWebSocket(url)
        with pytest.raises(TimeoutError, match="no message within 0.05 s"):
            ws.recv(0.05)
        ws.send("still here")
        assert ws.recv(10) == "still here"
        ws.close()


def test_pings_are_answered_while_waiting_for_a_message():
    answered = threading.Event()

    def pinger(ws: ServerConnection) -> None:
        ws.recv()
        pong = ws.ping()
        ws.send("after the ping")
        if pong.wait(10):
            answered.set()
        ws.recv()

    with server(pinger) as url:
        ws = BlockingWebSocket(url)
        ws.send("go")
        assert ws.recv(10) == "after the ping"
        assert answered.wait(10)
        ws.close()


def test_a_message_sent_before_the_close_is_read_first_then_the_close_code():
    def refuse(ws: ServerConnection) -> None:
        ws.send("why")
        ws.close(code=4401, reason="missing or wrong token")

    with server(refuse) as url:
        ws = BlockingWebSocket(url)
        wait_for(lambda: not ws.open)
        assert ws.recv(10) == "why"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (4401,
                                                                     "missing or wrong token")
        with pytest.raises(ConnectionClosed):
            ws.send("too late")
        ws.close()


def test_close_is_a_closing_handshake():
    codes = []

    def record(ws: ServerConnection) -> None:
        with pytest.raises(ConnectionClosed):
            ws.recv()
        codes.append(ws.close_code)

    with server(record) as url:
        BlockingWebSocket(url).close()
        wait_for(lambda: codes)
    assert codes == [1000]


def test_a_refused_handshake_raises_invalid_status():
    def forbid(connection, request):
        return connection.respond(HTTPStatus.FORBIDDEN, "no\n")

    with server(echo, process_request=forbid) as url, \
            pytest.raises(InvalidStatus) as refused:
        BlockingWebSocket(url)
    assert refused.value.response.status_code == 403


def test_headers_are_sent_with_the_handshake():
    seen = []

    def look(connection, request):
        seen.append(request.headers.get("Authorization"))

    with server(echo, process_request=look) as url:
        BlockingWebSocket(url, headers={"Authorization": "Bearer t0k"}).close()
    assert seen == ["Bearer t0k"]


@pytest.fixture
def tls_certificate(tmp_path, monkeypatch):
    """A self-signed certificate for localhost, trusted by default contexts; its files."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    return cert, key


def test_wss_carries_messages_pings_and_the_close(tls_certificate):
    cert, key = tls_certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    answered = threading.Event()

    def echo_after_a_ping(ws: ServerConnection) -> None:
        if ws.ping(b"tls").wait(10):
            answered.set()
        echo(ws)

    with server(echo_after_a_ping, ssl=context) as url:
        ws = BlockingWebSocket(url.replace("ws://127.0.0.1", "wss://localhost"))
        ws.send("x" * 300_000)  # many TLS records, more than one read
        ws.send("second")
        assert ws.recv(10) == "x" * 300_000
        assert ws.recv(10) == "second"
        assert answered.wait(10) and ws.open
        ws.close()
        assert not ws.open


def test_a_message_over_max_size_fails_the_connection():
    with server(echo) as url:
        ws = BlockingWebSocket(url, max_size=1000)
        ws.send("y" * 2000)
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(10)
        assert closed.value.sent is not None and closed.value.sent.code == 1009
        ws.close()


# A server written byte by byte, so that tests choose exactly what the client reads, and when.

_ACCEPT_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455, section 1.3
TEXT, BINARY, CONT, CLOSE, PING, PONG = 0x1, 0x2, 0x0, 0x8, 0x9, 0xA


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


def frame(opcode: int, payload: bytes | str, *, fin: bool = True, rsv: int = 0,
          mask: bytes = b"") -> bytes:
    """A frame as a server would send it (unmasked, unless ``mask`` is given)."""
    data = payload.encode() if isinstance(payload, str) else payload
    head = bytes([(0x80 if fin else 0) | rsv | opcode])
    mask_bit = 0x80 if mask else 0
    if len(data) < 126:
        head += bytes([mask_bit | len(data)])
    elif len(data) < 1 << 16:
        head += bytes([mask_bit | 126]) + len(data).to_bytes(2, "big")
    else:
        head += bytes([mask_bit | 127]) + len(data).to_bytes(8, "big")
    if mask:
        data = bytes(byte ^ mask[i % 4] for i, byte in enumerate(data))
    return head + mask + data


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
