"""Fuzzing the server: schemathesis over its OpenAPI schema, and hostile WebSocket frames.

Requests go to ``coding-gym serve`` running in its own process on a loopback port (the
``server`` fixture of this directory). The examples are bounded and derandomized, so a CI
run is repeatable; every request that reaches the sandbox runs in a real worker.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.generation import GenerationMode
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from coding_gym.server import create_app
from tests.hostile.conftest import TOKEN, Server

EXAMPLES = 25
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SCHEMA = schemathesis.openapi.from_dict(create_app().openapi())
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["valid", "invalid"])
@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_no_request_makes_the_server_fail(operation: Any, mode: GenerationMode,
                                          server: Server) -> None:
    """No 5xx, and responses match the schema (whose status codes are checked apart)."""
    excluded = [
        # Which codes each route declares is reported separately: a 404 for an unknown
        # session id is the right answer even where the schema does not list it.
        schemathesis.checks.status_code_conformance,
        # Random session ids are valid strings that name no session.
        schemathesis.checks.positive_data_acceptance,
    ]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def fuzz(case: Any) -> None:
        response = case.call(base_url=server.url, headers=AUTH, timeout=60)
        try:
            assert response.status_code < 500, (response.status_code, response.text[:500])
            case.validate_response(response, excluded_checks=excluded)
        finally:
            if operation.path == "/sessions" and response.status_code == 201:
                # Sessions left open would fill the server, whose 503 is then correct.
                httpx.delete(f"{server.url}/sessions/{response.json()['session_id']}",
                             headers=AUTH, timeout=30)

    try:
        fuzz()
    except Unsatisfiable:
        assert mode is GenerationMode.NEGATIVE
        pytest.skip(f"{operation.label} takes no input that its schema could call invalid")
    assert server.healthy()


# WebSocket frames.


def _ws_url(server: Server) -> str:
    return server.url.replace("http://", "ws://") + "/ws"


def _exchange(server: Server, frames: list[str | bytes]) -> list[dict[str, Any]]:
    with connect(_ws_url(server), additional_headers=AUTH, max_size=None,
                 open_timeout=30) as ws:
        replies = []
        for frame in frames:
            ws.send(frame)
            replies.append(json.loads(ws.recv(timeout=60)))
        # The session survives every bad frame: it still runs code.
        ws.send(json.dumps({"type": "step", "data": {"code": "print(6 * 7)"}}))
        last = json.loads(ws.recv(timeout=60))
        assert last["type"] == "observation", last
        assert last["data"]["observation"]["stdout"] == "42\n", last
    return replies


def _error_code(reply: dict[str, Any]) -> str:
    assert reply["type"] == "error", reply
    return str(reply["data"]["code"])


@pytest.mark.parametrize(("frame", "code"), [
    ("not json", "INVALID_JSON"),
    ("{\"type\": \"step\"", "INVALID_JSON"),
    ("[" * 100_000, "INVALID_JSON"),
    (b"\x00\xff\xfe\xfd binary garbage", "INVALID_JSON"),
    ("null", "VALIDATION_ERROR"),
    ("[1, 2]", "VALIDATION_ERROR"),
    ("\"step\"", "VALIDATION_ERROR"),
    (json.dumps({"type": "nope"}), "UNKNOWN_TYPE"),
    (json.dumps({"type": None}), "UNKNOWN_TYPE"),
    (json.dumps({"type": ["step"]}), "UNKNOWN_TYPE"),
    (json.dumps({"type": "step"}), "VALIDATION_ERROR"),
    (json.dumps({"type": "step", "data": "print(1)"}), "VALIDATION_ERROR"),
    (json.dumps({"type": "step", "data": {"code": 1}}), "VALIDATION_ERROR"),
    (json.dumps({"type": "step", "data": {"code": "1"}, "timeout_s": -1}), "VALIDATION_ERROR"),
    ("{\"type\": \"step\", \"data\": {\"code\": \"1\"}, \"timeout_s\": 1" + "0" * 400 + "}",
     "VALIDATION_ERROR"),
    (json.dumps({"type": "reset", "data": {"seed": -5}}), "VALIDATION_ERROR"),
    (json.dumps({"type": "state", "extra": 1}), "VALIDATION_ERROR"),
], ids=lambda value: repr(value)[:30] if isinstance(value, (str, bytes)) else None)
def test_bad_frames_get_the_documented_error_and_the_session_survives(frame, code, server):
    assert _error_code(_exchange(server, [frame])[0]) == code


def test_an_oversized_frame_is_refused_without_harm(server):
    # Above the server's message limit: an error reply; far above: close code 1009.
    big = json.dumps({"type": "step", "data": {"code": "x" * (2 << 20)}})
    assert _error_code(_exchange(server, [big])[0]) == "VALIDATION_ERROR"
    huge = json.dumps({"type": "step", "data": {"code": "x" * (16 << 20)}})
    with connect(_ws_url(server), additional_headers=AUTH, max_size=None,
                 open_timeout=30) as ws, pytest.raises(ConnectionClosed) as closed:
        # The frame's header says it all: the server may close before the rest is sent.
        ws.send(huge)
        ws.recv(timeout=60)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    assert server.healthy()


def test_out_of_order_messages_are_answered_in_order(server):
    replies = _exchange(server, [
        json.dumps({"type": "state"}),  # before any reset
        json.dumps({"type": "step", "data": {"code": "x = 1"}}),  # starts an episode
        json.dumps({"type": "reset"}),
        json.dumps({"type": "step", "data": {"code": "print(x)"}}),  # x is gone
    ])
    assert [reply["type"] for reply in replies] == ["state", "observation", "observation",
                                                   "observation"]
    assert "NameError" in replies[3]["data"]["observation"]["stderr"]


def test_pipelined_frames_are_all_answered_in_order(server):
    with connect(_ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        for i in range(200):
            ws.send(json.dumps({"type": "step", "data": {"code": f"print({i})"}}))
        outputs = [json.loads(ws.recv(timeout=60))["data"]["observation"]["stdout"]
                   for _ in range(200)]
    assert outputs == [f"{i}\n" for i in range(200)]


def test_a_closed_session_takes_no_more_messages(server):
    with connect(_ws_url(server), additional_headers=AUTH, open_timeout=30) as ws:
        ws.send(json.dumps({"type": "close"}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


def _raw_websocket(server: Server) -> socket.socket:
    """A WebSocket opened by hand, to send frames no client library would."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall((f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {TOKEN}\r\n\r\n").encode())
    response = b""
    while b"\r\n\r\n" not in response:
        response += sock.recv(4096)
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def _frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    header = struct.pack("!BB", 0x80 | opcode, 0x80 | length) if length < 126 else \
        struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    return header + mask + masked


def _close_code(sock: socket.socket) -> int | None:
    """The code of the close frame the server sends (None if it just hung up)."""
    data = b""
    try:
        while len(data) < 4 or len(data) < 2 + (data[1] & 0x7F):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        return None
    if len(data) >= 4 and data[0] & 0x0F == 0x8:
        return int(struct.unpack("!H", data[2:4])[0])
    return None


@pytest.mark.parametrize(("opcode", "payload", "expected"), [
    (0x1, b'{"type": "state", "x": "\xff\xfe"}', 1007),  # text frame, invalid UTF-8
    (0x3, b"reserved opcode", 1002),
    (0x9, b"p" * 200, 1002),  # a control frame longer than 125 bytes
])
def test_frames_that_break_the_websocket_protocol_close_it(opcode, payload, expected, server):
    with _raw_websocket(server) as sock:
        if opcode == 0x9:
            frame = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, len(payload)) + \
                b"\0\0\0\0" + payload
        else:
            frame = _frame(opcode, payload)
        sock.sendall(frame)
        assert _close_code(sock) == expected
    assert server.healthy()


def test_http_bodies_that_are_not_json_get_4xx(server):
    for body in (b"[" * 100_000, b"\xff\xfe", b"null", b'{"action": {"code": 1}}',
                 b'{"action": {"code": "1"}, "timeout_s": "NaN"}'):
        response = httpx.post(f"{server.url}/step", content=body, timeout=60,
                              headers={**AUTH, "Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (body[:20], response.status_code)
    assert server.healthy()
