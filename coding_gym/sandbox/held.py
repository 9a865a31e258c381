"""The worker's ``sys.stdout`` underneath its text layer: a step's output, held for the reply.

A step that prints a little (most do) used to cost a ``write`` to the stdout pipe here and a
``read`` of it in the parent. Its bytes now wait in memory and travel in the step's reply,
which is sent anyway. The bytes go to fd 1 as before, in order with everything else written
there, whenever the program flushes stdout itself (``print(..., flush=True)``,
``sys.stdout.flush()``, ``multiprocessing`` before it forks) and whenever more than
:data:`HOLD_BYTES` wait: then stdout behaves as a pipe with a bigger buffer, as Python's own
stdout is when it is not a terminal.

Only the worker's end of a step holds its bytes back (:meth:`HeldOutput.take`). A process that
ends abruptly (a hard kill, a crash) loses what was held, as it loses what sits in Python's
own buffer; so the amount held is kept small.
"""

from __future__ import annotations

import io
import os

#: Most bytes held in memory; past that they go to fd 1.
HOLD_BYTES = 8192
_write = os.write


class HeldOutput(io.RawIOBase):
    """A writable binary stream on fd 1 that holds its bytes until flushed or taken."""

    def __init__(self) -> None:
        super().__init__()
        self._held = bytearray()
        #: The worker's own flush at the end of a step: keep the bytes for the reply.
        self.holding = False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return 1

    def isatty(self) -> bool:
        return False

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        held = self._held
        held += data
        if len(held) > HOLD_BYTES:
            self._spill()
        return len(data)

    def flush(self) -> None:
        if not self.holding:
            self._spill()

    def take(self) -> bytes:
        """The bytes held, which the caller now sends; none are held afterwards."""
        if not self._held:
            return b""
        data = bytes(self._held)
        self._held.clear()
        return data

    def _spill(self) -> None:
        """Write the held bytes to fd 1 (all of them, or raise as ``FileIO`` would)."""
        if not self._held:
            return
        data = memoryview(bytes(self._held))
        self._held.clear()
        while data:
            data = data[_write(1, data):]
