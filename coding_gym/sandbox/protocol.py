"""Length-prefixed messages between the parent and a sandbox worker.

JSON rather than pickle: the parent must never unpickle bytes that code in the sandbox could
have written. ``ensure_ascii`` (the default) escapes lone surrogates, so any ``str`` survives.

The two messages of every step, the run request and its result, have a fixed binary layout
instead (a body starting with ``R`` or ``r``, never ``{``): JSON encoding and decoding were a
tenth of a step's cost. :func:`decode_run` and the parent's reader turn them back into the same
dicts as their JSON form.
"""

from __future__ import annotations

import array
import json
import select
import socket
import struct
from collections.abc import Sequence
from typing import Any

HEADER = struct.Struct("<I")
#: Largest message the parent accepts from a worker; replies are small (output uses pipes).
MAX_REPLY_BYTES = 1 << 20

# Built once: json.dumps with separators builds a new encoder at every call.
_dumps = json.JSONEncoder(separators=(",", ":")).encode
_loads = json.JSONDecoder().decode


#: A result frame's fields as ``FrameReader.result`` reads them: ``RESULT``'s, the kill
#: reason as its index in ``KILL_REASONS``.
ResultFields = tuple[int, int, int, int, int, int]


class ProtocolError(Exception):
    """A peer sent bytes that are not a valid message."""


#: Run request after its ``R``: timeout_s, snapshot flag; then the code as UTF-8.
RUN = struct.Struct("<d?")
#: A run request up to its code (header, ``R``, RUN), packed in one call.
_RUN_START = struct.Struct("<Ic" + RUN.format[1:])
#: Result after its ``r``: exit_code, kill_reason (index in KILL_REASONS), wall_ns, cpu_ns,
#: bytes left in the stdout and stderr pipes (-1: unknown).
RESULT = struct.Struct("<iBqqii")
KILL_REASONS = (None, "timeout", "memory")
#: How every whole result frame starts (its length, then ``r``), and its size.
_RESULT_START = HEADER.pack(1 + RESULT.size) + b"r"
RESULT_FRAME_BYTES = len(_RESULT_START) + RESULT.size


def encode(message: dict[str, Any]) -> bytes:
    body = _dumps(message).encode("ascii")
    return HEADER.pack(len(body)) + body


def encode_run(code: str, timeout_s: float, snapshot: bool = False) -> bytes:
    """The run request: ``{"cmd": "run", "code", "timeout_s", "snapshot"}``."""
    data = code.encode("utf-8", "surrogatepass")
    return _RUN_START.pack(1 + RUN.size + len(data), b"R", timeout_s, snapshot) + data


def decode_run(body: bytes) -> dict[str, Any]:
    timeout_s, snapshot = RUN.unpack_from(body, 1)
    code = body[1 + RUN.size:].decode("utf-8", "surrogatepass")
    return {"cmd": "run", "code": code, "timeout_s": timeout_s, "snapshot": snapshot}


def encode_result(exit_code: int, kill_reason: str | None, wall_ns: int, cpu_ns: int,
                  out_pending: int, err_pending: int) -> bytes:
    body = b"r" + RESULT.pack(exit_code, KILL_REASONS.index(kill_reason), wall_ns, cpu_ns,
                              out_pending, err_pending)
    return HEADER.pack(len(body)) + body


def kill_reason_of(code: int) -> str | None:
    """The kill reason a result frame's code stands for (None for an unknown code)."""
    return KILL_REASONS[code] if code < len(KILL_REASONS) else None


def decode_result(body: bytes | bytearray, offset: int = 1) -> dict[str, Any]:
    """The result whose fields start at ``offset`` of ``body`` (after its ``r``)."""
    exit_code, reason, wall_ns, cpu_ns, out, err = RESULT.unpack_from(body, offset)
    return {"type": "result", "exit_code": exit_code,
            "kill_reason": kill_reason_of(reason),
            "wall_ns": wall_ns, "cpu_ns": cpu_ns, "out": out, "err": err}


def fds_in(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds that came with a message: the ``SCM_RIGHTS`` of ``recvmsg``'s ancillary data.
    The receiver owns them (and must close those it does not keep)."""
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return fds.tolist()


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
    message = _loads(body.decode("utf-8", "surrogateescape"))
    if not isinstance(message, dict):
        raise ProtocolError(f"expected a JSON object, got {type(message).__name__}")
    return message


class FrameReader:
    """Incremental decoder for a non-blocking reader: feed bytes, take whole messages."""

    def __init__(self, max_bytes: int = MAX_REPLY_BYTES) -> None:
        self._buffer = bytearray()
        self._max_bytes = max_bytes

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        if not self._buffer:
            # Exactly one whole message, the usual case: no buffering.
            if len(data) == RESULT_FRAME_BYTES and data.startswith(_RESULT_START):
                return [decode_result(data, len(_RESULT_START))]
            if len(data) > HEADER.size and HEADER.unpack_from(data)[0] == len(data) - HEADER.size:
                return [self._decode(data[HEADER.size:])]
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > self._max_bytes:
                raise ProtocolError(f"message of {size} bytes exceeds {self._max_bytes}")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            message = self._decode(self._buffer[HEADER.size:end])
            del self._buffer[:end]
            messages.append(message)
        return messages

    @property
    def kept(self) -> bool:
        """Bytes are waiting for the rest of their message, or for :meth:`feed`."""
        return bool(self._buffer)

    def result(self, buffer: bytearray, size: int) -> ResultFields | None:
        """The fields of the result frame that ``buffer[:size]`` is (``RESULT``, the kill
        reason as its index) when it is exactly one and nothing came before; else None, and
        the bytes are kept for :meth:`feed`."""
        if size == RESULT_FRAME_BYTES and not self._buffer and buffer.startswith(_RESULT_START):
            return RESULT.unpack_from(buffer, len(_RESULT_START))
        self._buffer += memoryview(buffer)[:size]
        return None

    def _decode(self, body: bytes | bytearray) -> dict[str, Any]:
        if len(body) > self._max_bytes:
            raise ProtocolError(f"message of {len(body)} bytes exceeds {self._max_bytes}")
        if body[:1] == b"r":
            if len(body) != 1 + RESULT.size:
                raise ProtocolError(f"a result of {len(body)} bytes")
            return decode_result(body)
        try:
            message = _loads(body.decode("utf-8", "surrogateescape"))
        except ValueError as e:
            raise ProtocolError(f"invalid JSON from worker: {e}") from e
        if not isinstance(message, dict):
            raise ProtocolError(f"expected a JSON object, got {type(message).__name__}")
        return message


class Channel:
    """The worker's end of a socket: blocking, whole messages in and out, fds alongside.

    A worker reads requests with it (the run request in its binary form, the others in JSON)
    and answers (a result in binary form, the rest in JSON).
    """

    _RECV_BYTES = 1 << 16
    _FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []
        # Waiting is done in poll, not in a blocking recvmsg: when the parent reads a reply,
        # the kernel wakes whatever sleeps on the sender's socket to say there is room to
        # write again. A process blocked in recvmsg is woken by that for nothing (a context
        # switch, and an interrupt to another CPU, every step); one in poll for POLLIN is not.
        self._readable = select.poll()
        self._readable.register(sock, select.POLLIN)

    def recv(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message and the fds that came with it; (None, []) when the peer is gone."""
        buffer = self._buffer
        while True:
            if len(buffer) >= HEADER.size:
                end = HEADER.size + HEADER.unpack_from(buffer)[0]
                if len(buffer) >= end:
                    body = bytes(buffer[HEADER.size:end])
                    message = decode_run(body) if body[:1] == b"R" else json.loads(body)
                    del buffer[:end]
                    fds, self._fds = self._fds, []
                    return (message if isinstance(message, dict) else {}), fds
            self._readable.poll()
            data, ancillary, _, _ = self.sock.recvmsg(self._RECV_BYTES, self._FD_SPACE)
            if ancillary:
                self._fds.extend(fds_in(ancillary))
            if not data:
                return None, []
            buffer += data

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if message["type"] == "result":
            data = encode_result(message["exit_code"], message["kill_reason"],
                                 message["wall_ns"], message["cpu_ns"], message["out"],
                                 message["err"])
        else:
            data = encode(message)
        if fds:
            sent = self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()
