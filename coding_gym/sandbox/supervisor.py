"""The parent's side of one worker: start it, talk to it, kill it with everything it started.

A worker starts in one of three ways, all ending in the same "ready" message on its control
socket: forked by the zygote (:mod:`coding_gym.sandbox.zygote`, the fast path), spawned as a
fresh ``sys.executable`` (the fallback), or woken from a frozen copy of another worker
(:mod:`coding_gym.sandbox.frozen`). Its pid is the one the kernel attaches to that message
(``SCM_CREDENTIALS``), never one the worker claims. Steps are driven by
:mod:`coding_gym.sandbox.steps`.
"""

from __future__ import annotations

import array
import json
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from coding_gym.errors import SnapshotError, WorkerStartError
from coding_gym.models import ExecResult, Limits
from coding_gym.sandbox import bootstrap, processes, protocol, walls
from coding_gym.sandbox.cgroups import Cgroup
from coding_gym.sandbox.channels import Channels
from coding_gym.sandbox.exits import ExitWatch, OrphanExit, ReportedExit, SpawnedExit
from coding_gym.sandbox.frozen import FrozenCopy, open_pidfd
from coding_gym.sandbox.inbox import Inbox
from coding_gym.sandbox.steps import Capture, StepRun, drain
from coding_gym.sandbox.zygote import Zygote, ZygoteError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 30.0


class WorkerProcess:
    """One live worker. Create it with :meth:`start`; it is gone after :meth:`kill`."""

    def __init__(self, channels: Channels, exit_watch: ExitWatch, cgroup: Cgroup | None,
                 zygote: Zygote | None) -> None:
        self.sock = channels.parent
        self.out_fd = channels.out_r
        self.err_fd = channels.err_r
        self.cgroup = cgroup
        self.zygote = zygote
        self.pid = 0
        self.pidfd: int | None = None
        self._exit = exit_watch
        self.inbox = Inbox(self.sock)
        self._oom_base = 0
        #: Copies born in this worker's cgroup, each with its number of wake-ups then: once
        #: woken again, a copy's handle is about a successor of another worker's.
        self._unparked: list[tuple[FrozenCopy, Cgroup | None, int]] = []
        self._copy_pids: set[int] = set()
        #: The worker was given its cgroup's files to join it by itself (at start-up).
        self._joins_itself = False
        self._pollers: tuple[select.poll, select.poll] | None = None
        self.alive = True
        #: Isolation layer -> {"active", "detail"}, as the worker reported it when ready.
        self.isolation: dict[str, Any] = {}
        # Guards ``alive`` against interrupt() from another thread while kill() reaps: a reaped
        # pid may be reused, so it must never be signalled after the reap.
        self._kill_lock = threading.Lock()

    # -- Starting ------------------------------------------------------------------------------

    @classmethod
    def start(cls, config: dict[str, Any], environment: dict[str, str], *,
              cgroup: Cgroup | None, zygote: Zygote | None,
              meanwhile: Callable[[], None] | None = None) -> WorkerProcess:
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
    def _spawn(cls, config: dict[str, Any], environment: dict[str, str],
               cgroup: Cgroup | None, meanwhile: Callable[[], None]) -> WorkerProcess:
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
        pidfd = open_pidfd(proc.pid)
        worker = cls(channels, SpawnedExit(proc, pidfd), cgroup, None)
        worker.pidfd = pidfd
        worker._became(proc.pid)
        meanwhile()
        worker._await_ready(expected_pid=proc.pid)
        return worker

    @classmethod
    def _fork_from(cls, zygote: Zygote, config: dict[str, Any], environment: dict[str, str],
                   cgroup: Cgroup | None, meanwhile: Callable[[], None]) -> WorkerProcess:
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
            _close(joining)
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
    def wake(cls, copy: FrozenCopy, *, cgroup: Cgroup | None, zygote: Zygote | None,
             parking: Cgroup | None = None,
             before_joining: Callable[[], None] | None = None) -> WorkerProcess:
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

    def fork(self, *, cgroup: Cgroup | None) -> WorkerProcess:
        """A new worker forked from this one: same variables, its own pipes and cgroup."""
        channels = Channels()
        try:
            if not self.send({"cmd": "fork"}, START_TIMEOUT_S, channels.child_fds()):
                raise WorkerStartError("the worker died before it could be forked")
            reply, fds = self._await_reply(START_TIMEOUT_S)
            _close(fds)
            if reply.get("type") != "forked":
                raise WorkerStartError(f"the worker could not fork: {reply.get('message')}")
        except WorkerStartError:
            channels.close_child_ends()
            channels.close_parent_ends()
            raise
        channels.close_child_ends()
        return self._adopt(channels, cgroup, self.zygote, "the worker")

    @classmethod
    def _adopt(cls, channels: Channels, cgroup: Cgroup | None, zygote: Zygote | None,
               origin: str, before_joining: Callable[[], None] | None = None
               ) -> WorkerProcess:
        """Finish the start of a copy: learn its pid, then have its exit reported."""
        worker = cls(channels, ExitWatch(), cgroup, zygote)
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
                            if self.cgroup is not None:
                                if self._joins_itself and message.get("joined_cgroup") is not True:
                                    self.cgroup.add(sender)  # no episode code ran yet
                                self.cgroup.lower_cpu_weight()
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

    # -- Talking -------------------------------------------------------------------------------

    def send(self, message: dict[str, Any] | bytes, timeout_s: float,
             fds: Sequence[int] = ()) -> bool:
        """Send one message (or its encoding); False when the worker is gone. Blocks (up to
        ``timeout_s``) only for messages bigger than the socket buffer."""
        data = message if isinstance(message, bytes) else protocol.encode(message)
        try:
            if fds:
                sent = self.sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                sent = self.sock.send(data)
            if sent < len(data):
                # Code bigger than the socket buffer (~400 kB) must wait for the worker to
                # read it.
                self.sock.settimeout(timeout_s)
                try:
                    self.sock.sendall(data[sent:])
                finally:
                    self.sock.setblocking(False)
        except OSError:
            return False
        return True

    def pollers(self) -> tuple[select.poll, select.poll]:
        """Poll objects for a step: (the reply and death only, those and the output pipes).

        Registered once per worker: its fds do not change.
        """
        if self._pollers is None:
            quiet, full = select.poll(), select.poll()
            for fd in (self.sock.fileno(), self._exit.fd):
                if fd >= 0:
                    quiet.register(fd, select.POLLIN)
                    full.register(fd, select.POLLIN)
            for fd in (self.out_fd, self.err_fd):
                full.register(fd, select.POLLIN)
            self._pollers = (quiet, full)
        return self._pollers

    def _await_reply(self, timeout_s: float) -> tuple[dict[str, Any], list[int]]:
        """The next message and its fds, outside of a step (commands other than run)."""
        deadline = time.monotonic() + timeout_s
        while self.inbox.connected:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            watched: list[Any] = [self.sock]
            if self._exit.fd >= 0:
                watched.append(self._exit.fd)
            select.select(watched, [], [], remaining)
            for message, fds in self.inbox.receive():
                return message, fds
            if self._exit.fd >= 0 and select.select([self._exit.fd], [], [], 0)[0]:
                break
        return {"type": "error", "message": "the worker is gone"}, []

    def begin(self, code: str, limits: Limits, *, snapshot: bool = False,
              parking: Cgroup | None = None, spent_s: float = 0.0) -> StepRun:
        """Send ``code``; drive the returned step with :func:`fanout.run_many`. ``spent_s``:
        see :class:`StepRun`."""
        if not snapshot and not spent_s:
            return StepRun(self, code, limits)  # no keywords: a class call makes them a dict
        return StepRun(self, code, limits, snapshot=snapshot, parking=parking, spent_s=spent_s)

    def run(self, code: str, limits: Limits) -> ExecResult:
        """Run ``code`` to completion, timeout or death; the worker may be dead afterwards."""
        return self.begin(code, limits).wait()

    def snapshot(self, parking: Cgroup | None) -> FrozenCopy:
        """Leave a frozen copy of the interpreter as it is now.

        The copy is moved into ``parking`` before this worker's cgroup is killed, not at once:
        a snapshot costs the fork alone.
        """
        if not self.send({"cmd": "snapshot"}, START_TIMEOUT_S):
            raise SnapshotError("the interpreter is gone")
        reply, fds = self._await_reply(START_TIMEOUT_S)
        if reply.get("type") != "snapshot" or len(fds) != 1:
            _close(fds)
            raise SnapshotError(f"no snapshot: {reply.get('message', 'no copy was made')}")
        copy = FrozenCopy(fds[0], reusable=True)
        self._unparked.append((copy, parking, copy.wakes))
        return copy

    # -- Ending --------------------------------------------------------------------------------

    @property
    def exit_fd(self) -> int:
        return self._exit.fd

    def exit_returncode(self, timeout_s: float) -> int | None:
        return self._exit.returncode(timeout_s)

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_kills() > self._oom_base

    def interrupt(self) -> None:
        """SIGKILL the worker and everything it started, from any thread.

        A step in progress in another thread sees the death at once and returns its result
        (``state_lost``); that thread still owns the clean-up (:meth:`kill`).
        """
        with self._kill_lock:
            if self.alive:
                self._signal_tree()

    def _signal_tree(self) -> None:
        for copy, parking, wakes in self._unparked:
            if copy.wakes != wakes:
                continue
            # Out of the cgroup about to be killed; and a copy still in the making is below
            # this worker in the tree, so its pid must be known to be spared.
            if copy.park(parking) and copy.pid is not None:
                self._copy_pids.add(copy.pid)
        self._unparked.clear()
        if self.pid <= 0:
            return
        processes.restore_session_weight(self.pid)
        if self.cgroup is not None:
            # The cgroup holds every process of the worker, wherever it moved in the tree.
            if self.pidfd is not None:
                try:
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                except OSError:
                    pass
            self.cgroup.kill()
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except OSError:
                pass
        else:
            processes.kill_tree(self.pid, pgid=self.pid, spare=self._copy_pids)

    def kill(self) -> None:
        """Kill the worker and everything it started; safe to call twice."""
        with self._kill_lock:
            if not self.alive:
                return
            self.alive = False
            self._signal_tree()
        if self.pid > 0 and isinstance(self._exit, SpawnedExit):
            self._exit.returncode(5.0)  # our child: reap it
        self.sock.close()

    def close(self) -> None:
        """Kill the worker and release the parent's ends of its pipes."""
        self.kill()
        self._exit.close()
        for fd in (self.out_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)
        self.out_fd = self.err_fd = -1
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        _close(self.inbox.fds)
        self.inbox.fds = []


def once(action: Callable[[], None] | None) -> Callable[[], None]:
    """``action`` (if any) at the first call only; later calls do nothing."""
    pending = [action] if action is not None else []

    def run() -> None:
        while pending:
            pending.pop()()

    return run


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


__all__ = ["START_TIMEOUT_S", "WorkerProcess"]
