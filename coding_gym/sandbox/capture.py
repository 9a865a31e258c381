"""A step's output as the parent reads it from the worker's stdout and stderr pipes.

While a step runs, the parent drains a pipe that fills (:func:`drain`) into a
:class:`Capture`, which keeps bytes up to the step's cap and counts what it drops. When the
reply comes, :func:`collect` reads what the worker says it left in the pipe and makes the
stream's text. See :mod:`coding_gym.sandbox.steps` for when each happens.
"""

from __future__ import annotations

import errno
import os
from typing import Any

_CHUNK = 1 << 16


class Capture:
    """Bytes of one output stream for one step, kept up to a cap."""

    __slots__ = ("data", "cap", "truncated")

    def __init__(self, cap: int) -> None:
        self.data = bytearray()
        self.cap = cap
        self.truncated = False

    def note(self, text: str) -> None:
        """Append a message of our own on a line of its own, past the cap if need be."""
        if self.data and not self.data.endswith(b"\n"):
            self.data += b"\n"
        self.data += text.encode()

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        self.data += chunk

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


def drain(fd: int, capture: Capture, pending: Any = -1) -> None:
    """Read everything available now from a non-blocking pipe, or the ``pending`` bytes the
    worker said it left there (an int from the worker: trusted for no more than a hint)."""
    if type(pending) is int and pending >= 0:
        if pending == 0:
            return
        while pending > 0:
            try:
                chunk = os.read(fd, min(pending, _CHUNK))
            except OSError:
                return
            if not chunk:
                return
            capture.add(chunk)
            pending -= len(chunk)
        return
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            return
        if not chunk:
            return
        capture.add(chunk)
        if len(chunk) < _CHUNK:
            return  # a short read emptied the pipe: spare the read that would say so


def collect(fd: int, capture: Capture | None, pending: Any, cap: int) -> tuple[str, bool]:
    """A stream's text at the step's end, and whether it was cut: ``capture`` holds what was
    drained from its pipe during the step (None: nothing was), ``pending`` is what the worker
    says it left there (see :func:`drain`).

    A short output that nothing drained before, as of most steps, is read and decoded
    as it is, in one read, without a :class:`Capture`.
    """
    if capture is None:
        if type(pending) is not int or pending < 0 or pending > cap or pending > _CHUNK:
            capture = Capture(cap)
        elif pending == 0:
            return "", False
        else:
            try:
                data = os.read(fd, pending)
            except OSError:
                data = b""
            if len(data) == pending:
                return data.decode("utf-8", "replace"), False
            capture = Capture(cap)  # the pipe held less than the worker said
            capture.add(data)
            pending -= len(data)
    if pending != 0 or type(pending) is not int:
        drain(fd, capture, pending)
    return capture.data.decode("utf-8", "replace"), capture.truncated


def with_note(text: str, message: str) -> str:
    """``text`` and then ``message`` on a line of its own (as :meth:`Capture.note`)."""
    if text and not text.endswith("\n"):
        text += "\n"
    return text + message
