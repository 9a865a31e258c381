"""How the parent learns that a worker ended, and how: one watch per way a worker starts.

A spawned worker is the parent's child (:class:`SpawnedExit`); one forked by the zygote is the
zygote's, which reports its exit status on a socket (:class:`ReportedExit`); a copy that no
zygote adopted is known by its pidfd alone (:class:`OrphanExit`). Each has an ``fd`` that turns
readable when the worker has ended, for the step loops to poll.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
from typing import Any


class ExitWatch:
    """How the parent learns that a worker ended and how: ``fd`` turns readable when it has."""

    fd = -1

    def returncode(self, timeout_s: float) -> int | None:
        """``Popen.returncode`` style (negative: killed by that signal); None if unknown."""
        return None

    def close(self) -> None:
        pass


class SpawnedExit(ExitWatch):
    """A spawned worker is our child: wait for it like any child."""

    def __init__(self, proc: subprocess.Popen[bytes], pidfd: int | None) -> None:
        self.proc = proc
        self.fd = -1 if pidfd is None else pidfd

    def returncode(self, timeout_s: float) -> int | None:
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None


class ReportedExit(ExitWatch):
    """The zygote reaps the worker and writes its exit status to a socket of ours."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.error = ""
        self._known = False
        self._returncode: int | None = None

    def forked(self, timeout_s: float) -> int | None:
        """The pid the zygote forked, which it reports first; None if it could not fork."""
        message = self._next(timeout_s)
        if message.get("type") == "forked" and isinstance(message.get("pid"), int):
            return int(message["pid"])
        self._record(message)
        return None

    def returncode(self, timeout_s: float) -> int | None:
        if not self._known:
            self._record(self._next(timeout_s))
        return self._returncode

    def _next(self, timeout_s: float) -> dict[str, Any]:
        if not select.select([self.sock], [], [], timeout_s)[0]:
            return {"type": "pending"}
        try:
            return dict(json.loads(self.sock.recv(4096) or b'{"type": "gone"}'))
        except (OSError, ValueError, TypeError):
            return {"type": "gone"}

    def _record(self, message: dict[str, Any]) -> None:
        if message.get("type") == "pending":
            return
        self._known = True
        if message.get("type") == "exit" and isinstance(message.get("returncode"), int):
            self._returncode = message["returncode"]
        self.error = str(message.get("message", ""))

    def close(self) -> None:
        self.sock.close()


class OrphanExit(ExitWatch):
    """A copy adopted by init (no zygote): its pidfd says that it ended, not how."""

    def __init__(self, pidfd: int | None) -> None:
        self.fd = -1 if pidfd is None else pidfd

    def returncode(self, timeout_s: float) -> int | None:
        if self.fd >= 0:
            select.select([self.fd], [], [], timeout_s)
        return None
