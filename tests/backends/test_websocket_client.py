"""BlockingWebSocket against a websockets server: messages, fragments, pings, closes, refusals,
TLS (test_websocket_client_bytes.py has the framing, byte by byte)."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.server import ServerConnection

from coding_gym.backends.websocket_client import BlockingWebSocket
from tests.servers import wait_for, websockets_server


@contextmanager
def server(handler: Callable[[ServerConnection], None], **options: Any) -> Iterator[str]:
    """A websockets server on loopback running ``handler`` per connection; its URL."""
    with websockets_server(handler, **options) as port:
        yield f"ws://127.0.0.1:{port}/ws"


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
