"""How a worker process comes to be, and says it is ready: the start-up half of
:class:`coding_gym.sandbox.supervisor.WorkerProcess`, which mixes this in.

A worker starts in one of four ways, all ending in the same "ready" message on its control
socket: forked by the zygote (:mod:`coding_gym.sandbox.zygote`, the fast path), spawned as a
fresh ``sys.executable`` (the fallback), woken from a frozen copy of another worker
(:mod:`coding_gym.sandbox.frozen`), or forked from a live worker. Its pid is the one the
kernel attaches to that message (``SCM_CREDENTIALS``), never one the worker claims, and it
joins its cgroup before it runs any code.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from coding_gym.errors import WorkerStartError
from coding_gym.sandbox import affinity, bootstrap, walls
from coding_gym.sandbox.capture import Capture, drain
from coding_gym.sandbox.cgroups import Cgroup
from coding_gym.sandbox.channels import Channels
from coding_gym.sandbox.exits import ExitWatch, OrphanExit, ReportedExit, SpawnedExit
from coding_gym.sandbox.frozen import FrozenCopy, open_pidfd
from coding_gym.sandbox.inbox import Inbox
from coding_gym.sandbox.zygote import Zygote, ZygoteError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0
#: The class that mixes :class:`StartUp` in (its constructors return one of it).
_W = TypeVar("_W", bound="StartUp")


class StartUp:
    """The start-up of :class:`~coding_gym.sandbox.supervisor.WorkerProcess`."""

    sock: socket.socket
    out_fd: int
    err_fd: int
    cgroup: Cgroup | None
    zygote: Zygote | None
    pid: int
    pidfd: int | None
    cpu: int
    inbox: Inbox
    isolation: dict[str, Any]
    _exit: ExitWatch
    _oom_base: int
    _joins_itself: bool
    _unparked: list[tuple[FrozenCopy, Cgroup | None, int]]

    if TYPE_CHECKING:
        def __init__(self, channels: Channels, exit_watch: ExitWatch, cgroup: Cgroup | None,
                     zygote: Zygote | None) -> None: ...

        def send(self, message: dict[str, Any] | bytes, timeout_s: float,
                 fds: Sequence[int] = ()) -> bool: ...

        def _await_reply(self, timeout_s: float) -> tuple[dict[str, Any], list[int]]: ...

        def kill(self) -> None: ...

        def close(self) -> None: ...

    @classmethod
    def start(cls: type[_W], config: dict[str, Any], environment: dict[str, str], *,
              cgroup: Cgroup | None, zygote: Zygote | None,
              meanwhile: Callable[[], None] | None = None) -> _W:
        """A ready worker for ``config`` (:func:`coding_gym.sandbox.isolation.worker_config`):
        forked by ``zygote`` when given (spawned if that fails), else spawned.

        ``environment`` is its whole environment; its directory is ``config["workdir"]``.
        ``meanwhile`` runs once, while the worker starts (at the latest before this returns
        or raises): the caller's work that need not come first.
        """
        run_meanwhile = once(meanwhile)
        try:
            if zygote is not None:
                try:
                    return cls._fork_from(zygote, config, environment, cgroup, run_meanwhile)
                except ZygoteError as e:
                    logger.warning("the zygote failed, spawning the worker instead: %s", e)
            return cls._spawn(config, environment, cgroup, run_meanwhile)
        finally:
            run_meanwhile()

    @classmethod
    def _spawn(cls: type[_W], config: dict[str, Any], environment: dict[str, str],
               cgroup: Cgroup | None, meanwhile: Callable[[], None]) -> _W:
        channels = Channels()
        try:
            proc = subprocess.Popen(
                bootstrap.python_command("worker", str(channels.child.fileno()),
                                         json.dumps(config)),
                stdin=subprocess.DEVNULL, stdout=channels.out_w, stderr=channels.err_w,
                pass_fds=(channels.child.fileno(),), cwd=config["workdir"], env=environment,
                start_new_session=True,
            )
        except OSError as e:
            channels.close_child_ends()
            channels.close_parent_ends()
            raise WorkerStartError(f"could not start the sandbox worker: {e}") from e
        channels.close_child_ends()
        affinity.reset_inherited(proc.pid)
        pidfd = open_pidfd(proc.pid)
        worker = cls(channels, SpawnedExit(proc, pidfd), cgroup, None)
        worker.pidfd = pidfd
        worker._became(proc.pid)
        meanwhile()
        worker._await_ready(expected_pid=proc.pid)
        return worker

    @classmethod
    def _fork_from(cls: type[_W], zygote: Zygote, config: dict[str, Any],
                   environment: dict[str, str], cgroup: Cgroup | None,
                   meanwhile: Callable[[], None]) -> _W:
        channels = Channels()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        joining = cgroup.joining_fds() if cgroup is not None else []
        request = {"config": config, "workdir": config["workdir"], "environment": environment}
        try:
            pid = zygote.start_worker(walls.kind_of(config), request,
                                      [*channels.child_fds(), *joining], theirs.fileno())
            if pid is None:
                zygote.fork_worker(request, [*channels.child_fds(), theirs.fileno(), *joining])
        except ZygoteError:
            ours.close()
            channels.close_parent_ends()
            raise
        finally:
            theirs.close()
            channels.close_child_ends()
            close_all(joining)
        exit_watch = ReportedExit(ours)
        worker = cls(channels, exit_watch, cgroup, zygote)
        worker._joins_itself = bool(joining)
        meanwhile()
        if pid is None:
            pid = exit_watch.forked(START_TIMEOUT_S)
        if pid is None:
            worker._start_failed("the zygote", Capture(0), exit_watch.error or None)
        else:
            worker._became(pid)  # while it starts
            worker._await_ready(expected_pid=pid)
        return worker

    @classmethod
    def wake(cls: type[_W], copy: FrozenCopy, *, cgroup: Cgroup | None, zygote: Zygote | None,
             parking: Cgroup | None = None,
             before_joining: Callable[[], None] | None = None) -> _W:
        """The worker that a (parked) frozen copy becomes, in ``cgroup``; the successor it
        leaves for a reusable copy goes to ``parking`` before ``cgroup`` is next killed.

        ``before_joining`` runs once the copy is ready, before it enters ``cgroup`` (or once
        it has failed): the worker being replaced is killed there, cgroup included. Not
        sooner: that worker's exit (~1 ms of CPU) would compete with the copy's start-up.
        """
        channels = Channels()
        run_before_joining = once(before_joining)
        try:
            try:
                copy.wake(channels.child_fds())
            except WorkerStartError:
                channels.close_parent_ends()
                raise
            finally:
                channels.close_child_ends()
            worker = cls._adopt(channels, cgroup, zygote, "the frozen copy",
                                run_before_joining)
            if copy.reusable:
                worker._unparked.append((copy, parking, copy.wakes))
            return worker
        finally:
            run_before_joining()

    def fork(self: _W, *, cgroup: Cgroup | None) -> _W:
        """A new worker forked from this one: same variables, its own pipes and cgroup."""
        channels = Channels()
        try:
            if not self.send({"cmd": "fork"}, START_TIMEOUT_S, channels.child_fds()):
                raise WorkerStartError("the worker died before it could be forked")
            reply, fds = self._await_reply(START_TIMEOUT_S)
            close_all(fds)
            if reply.get("type") != "forked":
                raise WorkerStartError(f"the worker could not fork: {reply.get('message')}")
        except WorkerStartError:
            channels.close_child_ends()
            channels.close_parent_ends()
            raise
        channels.close_child_ends()
        return self._adopt(channels, cgroup, self.zygote, "the worker")

    @classmethod
    def _adopt(cls: type[_W], channels: Channels, cgroup: Cgroup | None, zygote: Zygote | None,
               origin: str, before_joining: Callable[[], None] | None = None
               ) -> _W:
        """Finish the start of a copy: learn its pid, then have its exit reported."""
        worker = cls(channels, ExitWatch(), cgroup, zygote)
        worker.cpu = affinity.UNKNOWN  # a copy: pinned where the worker it copies was, if it was
        worker._await_ready(origin=origin, before_joining=before_joining)
        exit_watch: ExitWatch = OrphanExit(worker.pidfd)
        if zygote is not None and zygote.alive:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                zygote.watch(worker.pid, theirs.fileno())
                exit_watch = ReportedExit(ours)
            except ZygoteError:
                ours.close()
            finally:
                theirs.close()
        worker._exit = exit_watch
        return worker

    def _became(self, pid: int) -> None:
        """The worker is process ``pid``: put it in its cgroup before it runs any code."""
        self.pid = pid
        if self.pidfd is None:
            self.pidfd = open_pidfd(pid)
        if self.cgroup is not None:
            self._oom_base = self.cgroup.oom_kills()
            if not self._joins_itself:
                self.cgroup.add(pid)

    def _await_ready(self, expected_pid: int | None = None,
                     origin: str = "the sandbox worker",
                     before_joining: Callable[[], None] | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        err = Capture(1 << 16)
        poller = select.poll()
        for fd in (self.sock.fileno(), self.out_fd, self.err_fd, self._exit.fd):
            if fd >= 0:
                poller.register(fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.close()
                raise WorkerStartError(f"{origin} did not start within {START_TIMEOUT_S:g} s")
            for fd, _ in poller.poll(remaining * 1000):
                if fd == self.err_fd:
                    drain(fd, err)
                elif fd == self.out_fd:
                    drain(fd, Capture(0))
                elif fd == self.sock.fileno():
                    for message, fds in self.inbox.receive():
                        for extra in fds:
                            os.close(extra)
                        sender = self.inbox.sender_pid
                        if message.get("type") == "ready" and sender is not None \
                                and expected_pid in (None, sender):
                            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 0)
                            if before_joining is not None:
                                before_joining()
                            if self.pid != sender:
                                self._became(sender)
                            if self.cgroup is not None and self._joins_itself \
                                    and message.get("joined_cgroup") is not True:
                                self.cgroup.add(sender)  # no episode code ran yet
                            report = message.get("isolation")
                            self.isolation = report if isinstance(report, dict) else {}
                            return
                        self._start_failed(origin, err, message.get("message"))
                    if not self.inbox.connected:
                        self._start_failed(origin, err, None)
                else:
                    self._start_failed(origin, err, None)

    def _start_failed(self, origin: str, err: Capture, message: Any) -> None:
        returncode = self._exit.returncode(0.5)
        self.kill()
        drain(self.err_fd, err)
        self.close()
        reason = message or getattr(self._exit, "error", "") or err.text().strip()[-2000:]
        raise WorkerStartError(
            f"{origin} exited during start-up (status {returncode}): {reason}"
        )


def once(action: Callable[[], None] | None) -> Callable[[], None]:
    """``action`` (if any) at the first call only; later calls do nothing."""
    pending = [action] if action is not None else []

    def run() -> None:
        while pending:
            pending.pop()()

    return run


def close_all(fds: Sequence[int]) -> None:
    """Close every fd of ``fds``."""
    for fd in fds:
        os.close(fd)
