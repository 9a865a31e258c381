"""Length-prefixed JSON messages between the parent and a sandbox worker.

JSON rather than pickle: the parent must never unpickle bytes that code in the sandbox could
have written. ``ensure_ascii`` (the default) escapes lone surrogates, so any ``str`` survives.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

HEADER = struct.Struct("<I")
#: Largest message the parent accepts from a worker; replies are small (output uses pipes).
MAX_REPLY_BYTES = 1 << 20

_dumps = json.dumps
_loads = json.loads


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid message."""


def encode(message: dict[str, Any]) -> bytes:
    body = _dumps(message, separators=(",", ":")).encode("ascii")
    return HEADER.pack(len(body)) + body


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(encode(message))


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """Block for one message; None when the peer has closed the connection."""
    header = _recv_exact(sock, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    body = _recv_exact(sock, size)
    if body is None:
        return None
    message = _loads(body)
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a JSON object, got {type(message).__name__}")
    return message


class FrameReader:
    """Incremental decoder for a non-blocking reader: feed bytes, take whole messages."""

    def __init__(self, max_bytes: int = MAX_REPLY_BYTES) -> None:
        self._buffer = bytearray()
        self._max_bytes = max_bytes

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > self._max_bytes:
                raise ProtocolError(f"message of {size} bytes exceeds {self._max_bytes}")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            try:
                message = _loads(bytes(self._buffer[HEADER.size:end]))
            except ValueError as e:
                raise ProtocolError(f"invalid JSON from worker: {e}") from e
            del self._buffer[:end]
            if not isinstance(message, dict):
                raise ProtocolError(f"expected a JSON object, got {type(message).__name__}")
            messages.append(message)
        return messages
