"""The server's WebSocket frames, byte by byte: the direct path of whole data frames and the
hand-over to uvicorn's path for everything else (coding_gym/server/wsprotocol.py)."""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from collections.abc import Iterator

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.sync.client import connect

from coding_gym.server import create_app
from coding_gym.server.serving import BackgroundServer
from coding_gym.server.wsprotocol import DirectFramesProtocol, split_frame
from coding_gym.wsframes import TEXT, header
from tests.servers import TEST_LIMITS, running_server, wait_for
from tests.wsbytes import client_frame


def message(kind: str, **data: object) -> bytes:
    text = {"type": kind, "data": data} if kind != "state" else {"type": kind}
    return client_frame(json.dumps(text).encode())


class RawClient:
    """A WebSocket client that writes exactly the bytes a test gives it."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=15)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                           "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 101"), head

    def _recv(self) -> bytes:
        data = self.sock.recv(1 << 16)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def frame(self) -> tuple[int, bytes]:
        """The next frame from the server: (opcode, payload)."""
        while True:
            where = split_frame(self.buffer, 0)
            if where is not None:
                first, start, end, mask = where
                assert mask == -1, "a server's frames are never masked"
                payload, self.buffer = self.buffer[start:end], self.buffer[end:]
                return first & 0x0F, payload
            self.buffer += self._recv()

    def reply(self) -> dict[str, object]:
        opcode, payload = self.frame()
        assert opcode == 0x1, (opcode, payload)
        return json.loads(payload)

    def close_code(self) -> int:
        """The code of the server's close frame; replies before it are passed over (a
        close for a broken frame leaves at once, replies to earlier messages may not)."""
        opcode, payload = self.frame()
        while opcode == 0x1:
            opcode, payload = self.frame()
        assert opcode == 0x8, (opcode, payload)
        return int.from_bytes(payload[:2], "big")


@pytest.fixture(scope="module")
def server() -> Iterator[BackgroundServer]:
    with running_server(max_message_bytes=64 << 10) as server:
        yield server


@pytest.fixture
def client(server: BackgroundServer) -> Iterator[RawClient]:
    raw = RawClient(server.url)
    yield raw
    raw.sock.close()


def protocol_of(server: BackgroundServer, client: RawClient | socket.socket
                ) -> DirectFramesProtocol:
    """The server's side of ``client``'s connection (a RawClient, or any client's socket)."""
    sock = client.sock if isinstance(client, RawClient) else client
    port = sock.getsockname()[1]
    (protocol,) = [c for c in server._server.server_state.connections
                   if isinstance(c, DirectFramesProtocol) and c.client[1] == port]
    return protocol


def reads_directly(server: BackgroundServer, client: RawClient) -> bool:
    """Whether the server's side of ``client``'s connection still reads frames directly."""
    return protocol_of(server, client).direct


def test_frame_headers_take_the_three_length_forms():
    for length in (0, 125, 126, 65535, 65536):
        head = header(TEXT, length)
        assert split_frame(head + b"x" * length, 0) == (0x81, len(head), len(head) + length, -1)
        assert split_frame(head + b"x" * (length - 1), 0) is None or length == 0
    assert split_frame(b"\x81", 0) is None


def test_a_masked_frame_is_found_after_others():
    data = client_frame(b"one") + client_frame(b"two" * 100)
    first = split_frame(data, 0)
    assert first is not None and first[3] == 2 and first[2] == 2 + 4 + 3
    second = split_frame(data, first[2])
    assert second is not None and second[2] == len(data) and second[1] - second[3] == 4


def test_messages_split_byte_by_byte_and_packed_together_are_answered_in_order(server, client):
    client.sock.sendall(message("reset"))
    assert client.reply()["type"] == "observation"
    for byte in message("step", code="x = 41\nprint(x + 1)"):
        client.sock.sendall(bytes([byte]))
    assert client.reply()["data"]["observation"]["stdout"] == "42\n"
    client.sock.sendall(b"".join(message("step", code=f"print({i})") for i in range(40)))
    outputs = [client.reply()["data"]["observation"]["stdout"] for _ in range(40)]
    assert outputs == [f"{i}\n" for i in range(40)]
    assert reads_directly(server, client)


def test_a_backlog_beyond_what_the_session_reads_ahead_is_answered_in_order(server, client):
    # Past 64 waiting messages the session asks the protocol to pause reading, and to
    # resume once it has room again.
    client.sock.sendall(message("reset"))
    assert client.reply()["type"] == "observation"
    client.sock.sendall(b"".join(message("step", code=f"print({i})") for i in range(200)))
    outputs = [client.reply()["data"]["observation"]["stdout"] for _ in range(200)]
    assert outputs == [f"{i}\n" for i in range(200)]
    client.sock.sendall(message("state"))  # reading resumed
    assert client.reply()["type"] == "state"
    assert reads_directly(server, client)


def test_reading_pauses_while_the_session_is_far_behind_and_resumes(server, client):
    client.sock.sendall(message("reset"))
    assert client.reply()["type"] == "observation"
    # A hundred steps of 10 ms in one write: the session takes them faster than it runs them.
    client.sock.sendall(b"".join(message("step", code=f"import time\ntime.sleep(0.01)\n"
                                                      f"print({i})") for i in range(100)))
    protocol = protocol_of(server, client)
    wait_for(lambda: protocol.read_paused, timeout_s=5)
    outputs = [client.reply()["data"]["observation"]["stdout"] for _ in range(100)]
    assert outputs == [f"{i}\n" for i in range(100)]
    assert not protocol.read_paused
    client.sock.sendall(message("state"))
    assert client.reply()["type"] == "state"


def test_a_ping_between_messages_gets_its_pong_and_the_direct_path_goes_on(server, client):
    client.sock.sendall(message("state") + client_frame(b"are you there", opcode=0x9)
                        + message("state"))
    frames = [client.frame() for _ in range(3)]
    # The pong leaves at once, the replies once the app has them.
    assert (0xA, b"are you there") in frames
    replies = [json.loads(payload) for opcode, payload in frames if opcode == 0x1]
    assert [reply["type"] for reply in replies] == ["state", "state"]
    assert reads_directly(server, client)


def test_a_fragmented_message_is_reassembled_and_later_messages_still_served(server, client):
    text = json.dumps({"type": "state"}).encode()
    client.sock.sendall(client_frame(text[:5], fin=False) + client_frame(text[5:], opcode=0x0))
    assert client.reply()["type"] == "state"
    assert not reads_directly(server, client)  # uvicorn's path from there on
    client.sock.sendall(message("state"))
    assert client.reply()["type"] == "state"


def test_binary_frames_reach_the_app(server, client):
    client.sock.sendall(client_frame(json.dumps({"type": "state"}).encode(), opcode=0x2))
    assert client.reply()["type"] == "state"
    assert reads_directly(server, client)


def test_a_message_over_the_apps_limit_gets_its_error_and_the_session_goes_on(client):
    client.sock.sendall(message("step", code="#" * (80 << 10)))
    reply = client.reply()
    assert reply["type"] == "error"
    assert "limit" in str(reply["data"]["message"])
    client.sock.sendall(message("state"))
    assert client.reply()["type"] == "state"


def test_a_frame_beyond_any_message_closes_with_1009(client):
    client.sock.sendall(client_frame(b"x" * (300 << 10)))
    assert client.close_code() == 1009


def test_a_refused_frame_is_read_to_the_clients_end_not_reset(client):
    # A client streaming a message far over the limit: the header says so at once, and the
    # server's close frame comes while the client is still sending the rest.
    head = bytes([0x81, 0x80 | 127]) + (64 << 20).to_bytes(8, "big") + os.urandom(4)
    client.sock.sendall(head + b"x" * (64 << 10))
    assert client.close_code() == 1009
    for _ in range(32):  # what follows is read and dropped: no reset destroys the close
        client.sock.sendall(b"x" * (64 << 10))
    client.sock.shutdown(socket.SHUT_WR)
    assert client.sock.recv(1 << 16) == b""  # the server's end, after its close frame


def test_invalid_utf8_in_a_text_frame_closes_with_1007(client):
    client.sock.sendall(message("state") + client_frame(b"\xff\xfe"))
    assert client.close_code() == 1007


@pytest.mark.parametrize("frame", [client_frame(b"{}", masked=False),
                                   client_frame(b"{}", rsv=0x40)],
                         ids=["unmasked", "reserved bit"])
def test_frames_breaking_the_protocol_close_with_1002(client, frame):
    client.sock.sendall(frame)
    assert client.close_code() == 1002


def test_a_client_close_is_answered_and_ends_the_connection(client):
    client.sock.sendall(message("state") + client_frame(struct.pack("!H", 1000), opcode=0x8))
    assert client.close_code() == 1000


def _steps_through(url: str, server: BackgroundServer
                   ) -> tuple[list[object], list[str], bool]:
    """Steps from websockets' client, which offers compression: the extensions agreed,
    what the steps printed, and whether the server still reads the frames directly."""
    with connect(url.replace("http://", "ws://") + "/ws", max_size=None) as ws:
        outputs = []
        for code in ("big = 'ab' * 50_000", "print(big)", "print(len(big))"):
            ws.send(json.dumps({"type": "step", "data": {"code": code}}))
            outputs.append(json.loads(ws.recv(timeout=30))["data"]["observation"]["stdout"])
        direct = protocol_of(server, ws.socket).direct
        return list(ws.protocol.extensions), outputs, direct


def test_compression_offered_by_a_client_is_declined_and_frames_stay_direct(server):
    extensions, outputs, direct = _steps_through(server.url, server)
    assert extensions == []
    assert outputs == ["", "ab" * 50_000 + "\n", "100000\n"]
    assert direct


def test_compression_when_the_server_accepts_it_is_agreed_and_every_message_answered():
    app = create_app(limits=TEST_LIMITS)
    with BackgroundServer(app, ws_per_message_deflate=True) as deflating:
        extensions, outputs, direct = _steps_through(deflating.url, deflating)
    assert [type(e) for e in extensions] == [PerMessageDeflate]
    assert outputs == ["", "ab" * 50_000 + "\n", "100000\n"]
    assert not direct  # compressed frames go through uvicorn's path, which inflates them
