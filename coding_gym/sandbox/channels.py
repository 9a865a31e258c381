"""The fds between the parent and a worker to be: a control socket pair, stdout and stderr
pipes. The parent keeps its ends; the child's ends go to whoever starts the worker (a spawn, the
zygote, a frozen copy) and are closed here once sent.
"""

from __future__ import annotations

import fcntl
import os
import socket

_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031


class Channels:
    """The fds of a worker to be: control socket pair, stdout and stderr pipes."""

    def __init__(self) -> None:
        self.parent, self.child = socket.socketpair()
        # The kernel attaches the sender's pid to what arrives while this is on: that is how
        # the parent learns which process the worker is, whoever started it.
        self.parent.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.parent.setblocking(False)
        self.out_r, self.out_w = os.pipe()
        self.err_r, self.err_w = os.pipe()
        os.set_blocking(self.out_r, False)
        os.set_blocking(self.err_r, False)
        for fd in (self.out_w, self.err_w):
            try:
                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # bigger pipes only save wake-ups

    def child_fds(self) -> list[int]:
        return [self.child.fileno(), self.out_w, self.err_w]

    def close_child_ends(self) -> None:
        self.child.close()
        for fd in (self.out_w, self.err_w):
            os.close(fd)

    def close_parent_ends(self) -> None:
        self.parent.close()
        for fd in (self.out_r, self.err_r):
            os.close(fd)
