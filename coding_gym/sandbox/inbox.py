"""The parent's reading end of a worker's control socket: whole messages, the fds that came
with them, and the pid of the process that sent them (``SCM_CREDENTIALS``, while asked for).

A plain step's reply is read apart (:meth:`Inbox.receive_result`): into a buffer kept for it,
and straight into the fields of its result, with no bytes object, message dict or list per
step. Anything else that arrives is left for :meth:`Inbox.receive`.
"""

from __future__ import annotations

import array
import logging
import socket
import struct
from typing import Any

from coding_gym.sandbox import protocol

logger = logging.getLogger(__name__)

_CHUNK = 1 << 16
_UCRED = struct.Struct("3i")
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4 * array.array("i").itemsize)


class Inbox:
    """Messages from one worker, read from the parent's end of its (non-blocking) socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        #: False once the worker is gone or spoke garbage.
        self.connected = True
        #: The pid the kernel attached to the latest message, while SO_PASSCRED is on.
        self.sender_pid: int | None = None
        self.fds: list[int] = []  # received, not yet handed out with their message
        self._frames = protocol.FrameReader()
        self._buffer = bytearray(protocol.RESULT_FRAME_BYTES + 1)  # more: not a result alone

    def receive(self, with_fds: bool = True) -> list[tuple[dict[str, Any], list[int]]]:
        """The whole messages available now, each with the fds that came with it.

        Without ``with_fds`` (a plain step) fds are not read: the kernel closes any sent.
        """
        received: list[tuple[dict[str, Any], list[int]]] = []
        kept = self._frames.kept  # bytes receive_result took: parse them first
        while self.connected:
            if kept:
                kept, data = False, b""
            else:
                try:
                    if with_fds:
                        data, ancillary, _, _ = self.sock.recvmsg(_CHUNK, _ANCILLARY)
                        self._take_ancillary(ancillary)
                    else:
                        data = self.sock.recv(_CHUNK)
                except BlockingIOError:
                    break
                except OSError:
                    self.connected = False
                    break
                if not data:
                    self.connected = False
                    break
            try:
                messages = self._frames.feed(data)
            except protocol.ProtocolError as e:
                logger.warning("worker %s sent an invalid message: %s", self.sender_pid, e)
                self.connected = False
                break
            for message in messages:
                fds_of_message, self.fds = self.fds, []
                received.append((message, fds_of_message))
            if 0 < len(data) < _CHUNK:
                break
        return received

    def receive_result(self) -> protocol.ResultFields | None:
        """A plain step's reply, as the fields of its result (``protocol.RESULT``), when it
        comes whole and alone, as from any sound worker; else None, and :meth:`receive`
        returns what came. No fds are read."""
        try:
            size = self.sock.recv_into(self._buffer)
        except BlockingIOError:
            return None
        except OSError:
            self.connected = False
            return None
        if not size:
            self.connected = False
            return None
        return self._frames.result(self._buffer, size)

    def _take_ancillary(self, ancillary: list[tuple[int, int, bytes]]) -> None:
        for level, kind, payload in ancillary:
            if level != socket.SOL_SOCKET:
                continue
            if kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                self.fds.extend(fds)
            elif kind == socket.SCM_CREDENTIALS:
                self.sender_pid = _UCRED.unpack(payload[:_UCRED.size])[0]
