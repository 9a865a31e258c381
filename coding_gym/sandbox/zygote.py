"""The zygote: a warmed-up Python that forks each episode's worker, so a reset costs a fork.

A fresh interpreter costs 40-55 ms to start (110-130 ms when the code imports NumPy); a fork of
one that has already imported everything costs 1-2 ms. The zygote is that parent: started once
per process (lazily, by :func:`get`) and shared by every backend of the process, it imports the
modules to preload and forks workers ahead (``zygote_loop.py`` is the zygote's own side).
This module is the other side: starting it, giving a request to the spare child it offers (or
asking it for a worker when none is on offer), asking for the exit status of workers and of
their copies, and stopping it.
"""

from __future__ import annotations

import array
import atexit
import importlib.util
import json
import logging
import os
import select
import signal
import socket
import subprocess
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from coding_gym.sandbox import affinity, bootstrap, isolation
from coding_gym.sandbox.protocol import fds_in
from coding_gym.sandbox.spare import MAX_MESSAGE

logger = logging.getLogger(__name__)

#: Modules the default zygote imports, each only if it is installed.
DEFAULT_PRELOAD: tuple[str, ...] = ("numpy",)
START_TIMEOUT_S = 60.0
_ONE_FD_SPACE = socket.CMSG_SPACE(array.array("i").itemsize)


class ZygoteError(OSError):
    """The zygote could not be started or refused to serve."""


class Zygote:
    """A running zygote, seen from the process that uses it. Get one with :func:`get`."""

    def __init__(self, preload: Sequence[str]) -> None:
        self.preload = tuple(preload)
        self._lock = threading.Lock()
        #: (network, filesystem) namespaces -> the spare on offer: its pid and the socket its
        #: request goes down (see zygote_loop.py).
        self._offers: dict[tuple[bool, bool], tuple[int, socket.socket]] = {}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        settings = json.dumps({"preload": list(self.preload)})
        home = tempfile.gettempdir()
        try:
            self.proc = subprocess.Popen(
                bootstrap.python_command("zygote_loop", str(theirs.fileno()), settings),
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),), cwd=home,
                env=isolation.worker_environment(home), start_new_session=True,
            )
        except OSError as e:
            ours.close()
            raise ZygoteError(f"could not start the zygote: {e}") from e
        finally:
            theirs.close()
        self.channel = ours
        self.pid = self.proc.pid
        affinity.reset_inherited(self.pid)
        try:
            ready = self._await_ready()
        except BaseException:
            self.close()
            raise
        self.imported: list[str] = ready.get("imported", [])
        self.failed: dict[str, str] = ready.get("failed", {})
        #: Address space of the zygote, which each worker starts with (RLIMIT_AS counts it).
        self.vm_bytes = int(ready.get("vm_bytes", 0))
        if ready.get("threads", 1) != 1:
            self.close()
            raise ZygoteError(
                f"the preloaded modules {list(self.preload)} started threads in the zygote, "
                "and forking a threaded process is unsafe; preload other modules"
            )

    def _await_ready(self) -> dict[str, Any]:
        ready, _, _ = select.select([self.channel], [], [], START_TIMEOUT_S)
        if not ready:
            raise ZygoteError(f"the zygote did not start within {START_TIMEOUT_S:g} s")
        data = self.channel.recv(MAX_MESSAGE)
        if not data:
            raise ZygoteError(f"the zygote exited during start-up (status {self.proc.wait()})")
        return dict(json.loads(data))

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def fork_worker(self, request: dict[str, Any], fds: Sequence[int]) -> None:
        """Ask for a worker: ``fds`` = [control socket, stdout, stderr, status socket, then
        the cgroup files it joins by itself]. The status socket says its pid first."""
        self._send({"cmd": "fork", **request}, fds)

    def start_worker(self, kind: tuple[bool, bool], request: dict[str, Any],
                     fds: Sequence[int], status_fd: int) -> int | None:
        """Give ``request`` to the spare on offer for namespaces of ``kind``, and have the
        zygote report its exit on ``status_fd``: the worker's pid, or None when no spare is
        on offer (or it is gone) and :meth:`fork_worker` must ask for one instead.

        ``fds`` = [control socket, stdout, stderr, then the cgroup files it joins itself].
        """
        with self._lock:
            self._read_offers()
            offer = self._offers.pop(kind, None)
        if offer is None:
            return None
        pid, spare = offer
        try:
            socket.send_fds(spare, [json.dumps({"cmd": "fork", **request}).encode()], list(fds))
        except OSError:
            return None  # it died waiting: the zygote forks one for the request
        finally:
            spare.close()
        try:
            self._send({"cmd": "took", "pid": pid, "kind": list(kind),
                        "environment": request.get("environment")}, [status_fd])
        except ZygoteError:
            try:
                os.kill(pid, signal.SIGKILL)  # nobody would learn how it ends
            except OSError:
                pass
            raise
        return pid

    def _read_offers(self) -> None:
        """Take the spares the zygote offered since the last look (the channel's lock held)."""
        while True:
            try:
                # Not socket.recv_fds: it drops its flags argument (Python 3.11).
                data, ancillary, _, _ = self.channel.recvmsg(MAX_MESSAGE, _ONE_FD_SPACE,
                                                             socket.MSG_DONTWAIT)
            except OSError:  # BlockingIOError: nothing more; else the zygote is gone
                return
            fds = fds_in(ancillary)
            if not data:
                for fd in fds:
                    os.close(fd)
                return
            try:
                offer = json.loads(data)
                pid, (network, filesystem) = int(offer["pid"]), offer["kind"]
                kind = (bool(network), bool(filesystem))
                if offer.get("type") != "spare" or len(fds) != 1:
                    raise ValueError(offer)
            except (ValueError, TypeError, KeyError):
                for fd in fds:
                    os.close(fd)
                continue
            stale = self._offers.pop(kind, None)
            if stale is not None:
                stale[1].close()
            self._offers[kind] = (pid, socket.socket(fileno=fds[0]))

    def watch(self, pid: int, status_fd: int) -> None:
        """Report the exit status of ``pid`` (a copy of a worker) on ``status_fd``."""
        self._send({"cmd": "watch", "pid": pid}, [status_fd])

    def _send(self, message: dict[str, Any], fds: Sequence[int]) -> None:
        try:
            with self._lock:
                socket.send_fds(self.channel, [json.dumps(message).encode()], list(fds))
        except OSError as e:
            raise ZygoteError(f"the zygote is gone: {e}") from e

    def close(self) -> None:
        """Stop the zygote: it kills the workers it still has. Safe to call twice."""
        with self._lock:
            for _, spare in self._offers.values():
                spare.close()
            self._offers.clear()
        self.channel.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


_registry_lock = threading.Lock()
_zygotes: dict[tuple[str, ...], Zygote] = {}
_failures: dict[tuple[str, ...], str] = {}


def default_preload() -> tuple[str, ...]:
    """:data:`DEFAULT_PRELOAD`, without the modules that are not installed."""
    return tuple(name for name in DEFAULT_PRELOAD if importlib.util.find_spec(name) is not None)


def get(preload: Sequence[str] | None = None) -> Zygote | None:
    """The process's zygote for ``preload`` (default :func:`default_preload`), started on first
    use and restarted if it died; None when it cannot run here (logged once). Thread-safe."""
    key = default_preload() if preload is None else tuple(preload)
    with _registry_lock:
        zygote = _zygotes.get(key)
        if zygote is not None:
            if zygote.alive:
                return zygote
            logger.warning("the zygote (pid %d) died with status %s; starting a new one",
                           zygote.pid, zygote.proc.returncode)
            del _zygotes[key]
            zygote.close()
        if key in _failures:
            return None
        try:
            zygote = Zygote(key)
        except ZygoteError as e:
            _failures[key] = str(e)
            logger.warning("workers will be started from scratch: %s", e)
            return None
        if zygote.failed:
            logger.warning("the zygote could not import %s", zygote.failed)
        _zygotes[key] = zygote
        return zygote


def shutdown() -> None:
    """Stop every zygote of this process (at interpreter exit, or in tests)."""
    with _registry_lock:
        zygotes = list(_zygotes.values())
        _zygotes.clear()
        _failures.clear()
    for zygote in zygotes:
        zygote.close()


def _forget_after_fork() -> None:
    # A forked child of this process starts its own zygote when it needs one; the inherited
    # objects are dropped without closing anything the parent still uses.
    global _registry_lock
    _registry_lock = threading.Lock()
    _zygotes.clear()


atexit.register(shutdown)
os.register_at_fork(after_in_child=_forget_after_fork)
