"""``FrozenCopy``: the parent's handle on a frozen copy of a worker's interpreter.

A worker makes a frozen copy by forking (see ``copies.py``): the copy waits on a socket whose
other end it hands to the parent. A wake-up on that socket turns the copy into a new live
worker that talks over the fds sent along; to be restored again, it first forks a successor,
which waits on the same socket and introduces itself in turn. So one handle serves any number
of restores, each time through the process that froze last. That process exits as soon as
the parent closes its end (also when the parent's process dies), and is killed through its
pidfd on :meth:`release` in case it was stopped.

Copies are moved into a *parking* cgroup: the worker's own cgroup is killed as a whole when
the worker is, and the copies must survive that. A successor is forked by the woken worker
once it is ready, so it is parked like a new snapshot, before the worker's cgroup is next
killed. Nothing the copy says is trusted for its identity: its pid comes from the kernel
(``SCM_CREDENTIALS``).
"""

from __future__ import annotations

import array
import logging
import os
import select
import signal
import socket
import struct
import threading
from typing import Any

from coding_gym.errors import WorkerStartError
from coding_gym.sandbox import protocol
from coding_gym.sandbox.cgroups import Cgroup

logger = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
_ANCILLARY = socket.CMSG_SPACE(_UCRED.size) + socket.CMSG_SPACE(4 * array.array("i").itemsize)
HELLO_TIMEOUT_S = 5.0


class FrozenCopy:
    """A frozen copy of an interpreter, ready to be woken as a new worker.

    It is born in the worker's cgroup: :meth:`park` it before that cgroup is next killed.
    """

    def __init__(self, wake_fd: int, reusable: bool = False) -> None:
        self.sock = socket.socket(fileno=wake_fd)
        #: Restored any number of times (a snapshot), not once at most (a transactional
        #: step's copy, which leaves no successor).
        self.reusable = reusable
        #: The frozen process, once it has introduced itself.
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.parked = False
        #: How many times a process of this handle was woken.
        self.wakes = 0
        #: Introductions still to be read from processes that were woken before it was.
        self._stale = 0
        self._lock = threading.Lock()

    def park(self, parking: Cgroup | None) -> bool:
        """Have the frozen process in ``parking``, learning its pid; False if it is gone."""
        with self._lock:
            if self.parked:
                return True
            if self.sock.fileno() < 0:
                return False  # released: killed, if its pid was known
            pid = self._introduced(HELLO_TIMEOUT_S)
            if pid is None:
                return False
            if parking is not None:
                try:
                    parking.add(pid)
                except OSError as e:
                    logger.warning("could not park the frozen copy %d: %s", pid, e)
                    return False
            self.parked = True
            return True

    def wake(self, fds: list[int]) -> None:
        """Ask for a new worker over ``fds`` = [control socket, stdout, stderr] (sent, not
        closed). The new worker says it is ready on the control socket.

        The frozen process becomes that worker: from here on the handle is about its
        successor (if ``reusable``), or about nothing. The worker forks the successor once it
        is ready, perhaps once it has joined its cgroup: :meth:`park` it before that cgroup
        is next killed.
        """
        with self._lock:
            if self.pid is None:
                self._introduced(0)  # read what is there: introductions must not pile up
            try:
                self.sock.sendmsg(
                    [protocol.encode({"cmd": "wake", "again": self.reusable})],
                    [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))],
                )
            except OSError as e:
                raise WorkerStartError(f"the frozen copy {self.pid} is gone: {e}") from e
            if self.pid is None:
                self._stale += 1  # a restore does not wait for a successor to introduce itself
            if self.pidfd is not None:
                os.close(self.pidfd)
            self.pid = self.pidfd = None
            self.parked = False
            self.wakes += 1

    def release(self) -> None:
        """Let the copy go; safe to call twice."""
        with self._lock:
            if self.sock.fileno() < 0:
                return
            if self.pid is None:
                self._introduced(0)  # the pid, if it is known by now
            self.sock.close()
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except OSError:
                    pass
                os.close(self.pidfd)
                self.pidfd = None

    def _introduced(self, timeout_s: float) -> int | None:
        """The current frozen process's pid, reading introductions up to its own within
        ``timeout_s`` if it is not known yet; None if it has not introduced itself."""
        while self.pid is None:
            if self.sock.fileno() < 0:
                return None
            try:
                message, pid = receive_with_pid(self.sock, timeout_s)
            except (OSError, ValueError, protocol.ProtocolError) as e:
                if timeout_s:
                    logger.warning("a frozen copy did not introduce itself: %s", e)
                return None
            if message.get("type") != "frozen" or pid is None:
                return None
            if self._stale:
                self._stale -= 1
            else:
                self.pid, self.pidfd = pid, open_pidfd(pid)
        return self.pid


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid`` (Linux 5.3+), or None where the kernel has none."""
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


def receive_with_pid(sock: socket.socket, timeout_s: float
                     ) -> tuple[dict[str, Any], int | None]:
    """Block for one whole message; also return the sender's pid as the kernel saw it (when
    ``SO_PASSCRED`` was on at the receiving end before it was sent).

    Fds that arrive with it are closed: nobody asked for them.
    """
    reader = protocol.FrameReader()
    pid = None
    while True:
        if not select.select([sock], [], [], timeout_s)[0]:
            raise TimeoutError(f"no message within {timeout_s:g} s")
        data, ancillary, _, _ = sock.recvmsg(1 << 16, _ANCILLARY)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack(payload[:_UCRED.size])[0]
        for fd in protocol.fds_in(ancillary):
            os.close(fd)
        if not data:
            raise ConnectionError("the peer closed the socket")
        messages = reader.feed(data)
        if messages:
            return messages[0], pid
