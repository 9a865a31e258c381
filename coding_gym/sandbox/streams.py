"""A worker's output, step by step: fds 1 and 2, and ``sys.stdout`` and ``sys.stderr``.

Fds 1 and 2 are pipes the parent drains, so output of C code, ``os.system`` and child
processes is captured. The worker keeps private copies of them, as agent code may close or
redirect fds 1 and 2: they are put back before every step (:meth:`StepStreams.restore`), as are
``sys.stdout`` and ``sys.stderr``.

``sys.stdout`` does not write to its pipe at once. A step that prints a little (most do) used
to cost a ``write`` here and a ``read`` in the parent; its bytes now wait in memory
(:class:`HeldOutput`) and travel in the step's reply, which is sent anyway. They go to fd 1 as
before, in order with everything else written there, whenever the program flushes stdout itself
(``print(..., flush=True)``, ``sys.stdout.flush()``, ``multiprocessing`` before it forks),
whenever more than :data:`HOLD_BYTES` wait, and at the end of a step whose code pointed fd 1
elsewhere: stdout behaves as a pipe with a bigger buffer, as Python's own stdout does when it
is not a terminal. A process that ends abruptly (a hard kill, a crash) loses what was held, as
it loses what sits in Python's own buffer; so little is held.
"""

from __future__ import annotations

import array
import fcntl
import io
import os
import sys
import termios

from coding_gym.sandbox.libc import libc

#: Most bytes of stdout held in memory; past that they go to fd 1.
HOLD_BYTES = 8192
#: The worker's copies of fds 1 and 2 are numbered from here, out of the agent's way.
_SAFE_FD_BASE = 100
_write = os.write
_dup2 = os.dup2
_fstat = os.fstat
_ioctl = fcntl.ioctl
_FIONREAD = termios.FIONREAD


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


#: HeldOutput's class as made here: agent code that patched it (the class outlives the step,
#: where C streams like ``FileIO`` cannot be patched at all) patched it for its own step only.
_HELD_CLASS = dict(vars(HeldOutput))
_HELD_ATTRIBUTES = frozenset({"_held", "holding"})


def _held_intact(held: HeldOutput) -> bool:
    """Whether ``held`` and its class are as made here; the class is mended if need be."""
    if vars(HeldOutput) != _HELD_CLASS:
        for name in set(vars(HeldOutput)) - _HELD_CLASS.keys():
            delattr(HeldOutput, name)
        for name, value in _HELD_CLASS.items():
            if vars(HeldOutput).get(name) is not value:
                setattr(HeldOutput, name, value)
        return False
    return held.__dict__.keys() == _HELD_ATTRIBUTES and type(held) is HeldOutput \
        and type(held._held) is bytearray


class StepStreams:
    """The output streams of a worker's steps, on the pipes that are fds 1 and 2 now."""

    def __init__(self) -> None:
        self.fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self.fd_err = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self._out_file = _file_of(self.fd_out)
        self._new_stdout()
        self._new_stderr()

    def _new_stdout(self) -> None:
        self.held = HeldOutput()
        self.stdout = io.TextIOWrapper(self.held,  # type: ignore[type-var]  # a raw stream
                                       encoding="utf-8", errors="backslashreplace")

    def _drop_stdout(self) -> None:
        """Let go of a stdout that agent code closed or patched, without writing anything it
        still holds (once garbage, it would write it at any time)."""
        held = self.held
        try:
            held.__dict__.clear()
            held._held, held.holding = bytearray(), True
            self.stdout.detach()  # flushes what the text layer has into held, which keeps it
            held.close()
        except BaseException:  # noqa: BLE001 - closed, or broken by the code
            pass

    def _new_stderr(self) -> None:
        self.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                       errors="backslashreplace", line_buffering=True)

    def restore(self) -> None:
        """Before a step: fds 1 and 2, ``sys.stdout``, ``sys.stderr`` and ``sys.stdin`` as
        the worker set them, whatever the last step did to them."""
        _dup2(self.fd_out, 1)
        _dup2(self.fd_err, 2)
        # Code that closed or patched sys.stdout or sys.stderr did so for its own step only.
        if not _held_intact(self.held) or self.stdout.closed:  # mends the class first
            self._drop_stdout()
            self._new_stdout()
        if self.stderr.closed:
            self._new_stderr()
        sys.stdout, sys.stderr, sys.stdin = self.stdout, self.stderr, sys.__stdin__

    def finish(self) -> bytes:
        """After a step: push its output into the pipes, but for what stdout holds for the
        reply, which this returns."""
        held = self.held
        # Held only while fd 1 is still the stdout pipe: code that pointed it elsewhere
        # (os.dup2) has its output go there, as a flush would send it.
        held.holding = _file_of(1) == self._out_file
        try:
            self.flush()
            data = held.take()
        except BaseException:  # noqa: BLE001 - agent code may have patched the stream's class
            data = b""
        finally:
            held.holding = False
        return data if type(data) is bytes else b""

    def flush(self) -> None:
        """Push every buffered byte to its fd (before a fork: none may be written twice)."""
        for stream in (sys.stdout, sys.stderr):
            if stream is not self.stdout and stream is not self.stderr:
                try:
                    stream.flush()
                except BaseException:  # noqa: BLE001 - agent code may have broken its stream
                    pass
        for stream in (self.stdout, self.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - fd closed by the agent: restored next step
                pass
        if "ctypes" in sys.modules:
            flush_c_stdio()

    def pending(self) -> tuple[int, int]:
        """Bytes waiting in the stdout and stderr pipes (-1 where that cannot be known): the
        parent reads that much, and spares the reads that would find an empty pipe."""
        return _pending(self.fd_out), _pending(self.fd_err)

    def write_stderr(self, text: str) -> None:
        """Write a message of the worker's own (a traceback) to the step's stderr."""
        if not text:
            return
        try:
            self.stderr.write(text)
        except BaseException:  # noqa: BLE001 - fd 2 closed by the agent: restored next step
            pass

    def close(self) -> None:
        """Close the worker's copies of fds 1 and 2 (which stay open)."""
        os.close(self.fd_out)
        os.close(self.fd_err)


def flush_c_stdio() -> None:
    """Flush C-level stdio buffers (printf from ctypes or extensions) into the pipes."""
    try:
        libc().fflush(None)
    except (OSError, AttributeError):
        pass


def _file_of(fd: int) -> tuple[int, int] | None:
    """The (device, inode) that ``fd`` is open on; None for a closed fd."""
    try:
        status = _fstat(fd)
    except OSError:
        return None
    return status.st_dev, status.st_ino


_pending_count = array.array("i", [0])


def _pending(fd: int) -> int:
    """Bytes waiting to be read in the pipe behind ``fd``; -1 if that cannot be known."""
    try:
        _ioctl(fd, _FIONREAD, _pending_count, True)
    except OSError:
        return -1
    return _pending_count[0]
