"""A worker's output, step by step: fds 1 and 2, and ``sys.stdout`` and ``sys.stderr``.

Fds 1 and 2 are pipes the parent drains, so output of C code, ``os.system`` and child
processes is captured. The worker keeps private copies of them, as agent code may close or
redirect fds 1 and 2: they are put back before every step (:meth:`StepStreams.restore`), as are
``sys.stdout`` and ``sys.stderr``, which write to whatever fds 1 and 2 are when they flush
(at the end of a step at the latest), as Python's own streams do.
"""

from __future__ import annotations

import array
import fcntl
import io
import os
import sys
import termios

from coding_gym.sandbox.libc import libc

#: The worker's copies of fds 1 and 2 are numbered from here, out of the agent's way.
_SAFE_FD_BASE = 100
_dup2 = os.dup2
_ioctl = fcntl.ioctl
_FIONREAD = termios.FIONREAD


class StepStreams:
    """The output streams of a worker's steps, on the pipes that are fds 1 and 2 now."""

    def __init__(self) -> None:
        self.fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self.fd_err = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self._count = array.array("i", [0])
        self._out_raw, self.stdout = _text_stream(1)
        self._err_raw, self.stderr = _text_stream(2)

    def restore(self) -> None:
        """Before a step: fds 1 and 2, ``sys.stdout``, ``sys.stderr`` and ``sys.stdin`` as
        the worker set them, whatever the last step did to them."""
        _dup2(self.fd_out, 1)
        _dup2(self.fd_err, 2)
        # Code that closed sys.stdout or sys.stderr, or patched their file objects (whose
        # __dict__ holds their name alone; the classes are C types, which cannot be
        # patched), did so for its own step only.
        if self.stdout.closed or len(self._out_raw.__dict__) != 1:
            self._out_raw, self.stdout = _text_stream(1)
        if self.stderr.closed or len(self._err_raw.__dict__) != 1:
            self._err_raw, self.stderr = _text_stream(2)
        sys.stdout, sys.stderr, sys.stdin = self.stdout, self.stderr, sys.__stdin__

    def finish(self) -> tuple[int, int]:
        """After a step: push its output into the pipes; return how many bytes wait in the
        stdout and stderr pipes (-1 where that cannot be known), so that the parent reads
        that much, and spares the reads that would find an empty pipe."""
        self.flush()
        return self._pending(self.fd_out), self._pending(self.fd_err)

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

    def _pending(self, fd: int) -> int:
        """Bytes waiting to be read in the pipe behind ``fd``; -1 if that cannot be known."""
        try:
            _ioctl(fd, _FIONREAD, self._count, True)
        except OSError:
            return -1
        return self._count[0]


def _text_stream(fd: int) -> tuple[io.FileIO, io.TextIOWrapper]:
    """A file object on ``fd`` and the text stream over it: stdout buffered as Python's is on
    a pipe, stderr by line."""
    raw = io.FileIO(fd, "w", closefd=False)
    return raw, io.TextIOWrapper(raw, encoding="utf-8", errors="backslashreplace",
                                 line_buffering=fd == 2)


def flush_c_stdio() -> None:
    """Flush C-level stdio buffers (printf from ctypes or extensions) into the pipes."""
    try:
        libc().fflush(None)
    except (OSError, AttributeError):
        pass
