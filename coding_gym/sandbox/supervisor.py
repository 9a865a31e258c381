"""The parent's side of one worker: start it, talk to it, kill it with everything it started.

How a worker starts (forked by the zygote, spawned, woken from a frozen copy, or forked from
another worker) is in :mod:`coding_gym.sandbox.startup`, mixed in here. Steps are driven by
:mod:`coding_gym.sandbox.steps`.
"""

from __future__ import annotations

import array
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from coding_gym.errors import SnapshotError
from coding_gym.models import ExecResult, Limits
from coding_gym.sandbox import affinity, processes, protocol
from coding_gym.sandbox.cgroups import Cgroup
from coding_gym.sandbox.channels import Channels
from coding_gym.sandbox.exits import ExitWatch, SpawnedExit
from coding_gym.sandbox.frozen import FrozenCopy
from coding_gym.sandbox.inbox import Inbox
from coding_gym.sandbox.startup import START_TIMEOUT_S, StartUp, close_all
from coding_gym.sandbox.steps import StepRun
from coding_gym.sandbox.zygote import Zygote

_current_cpu = affinity.current_cpu


class WorkerProcess(StartUp):
    """One live worker. Create it with :meth:`start`; it is gone after :meth:`kill`."""

    def __init__(self, channels: Channels, exit_watch: ExitWatch, cgroup: Cgroup | None,
                 zygote: Zygote | None) -> None:
        self.sock = channels.parent
        #: The socket's fd, for the step loops (it is the same for the worker's whole life).
        self.sock_fd = self.sock.fileno()
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
        #: The CPU the worker is pinned to (see affinity.py), or affinity.FREE, or
        #: affinity.UNKNOWN (a copy of a worker that may have been pinned).
        self.cpu = affinity.FREE
        self._may_follow = True
        #: Isolation layer -> {"active", "detail"}, as the worker reported it when ready.
        self.isolation: dict[str, Any] = {}
        # Guards ``alive`` against interrupt() from another thread while kill() reaps: a reaped
        # pid may be reused, so it must never be signalled after the reap.
        self._kill_lock = threading.Lock()

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
        except BlockingIOError:
            if fds:
                return False  # not sent, and the fds must come with the first byte
            sent = 0
        except OSError:
            return False
        if sent == len(data):
            return True
        # Code bigger than the socket buffer (~400 kB) must wait for the worker to read it.
        self.sock.settimeout(timeout_s)
        try:
            self.sock.sendall(data[sent:])
        except OSError:
            return False
        finally:
            self.sock.setblocking(False)
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

    def idle(self) -> bool:
        """Up and idle with nothing to say: a readable or closed socket, or an exit status,
        would mean a step that ends in clean-up, or a worker that died while it waited."""
        return self.alive and not self.pollers()[0].poll(0)

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

    # -- Placement (see affinity.py) -----------------------------------------------------------

    def place(self, follow: bool) -> None:
        """Before a step: wait between steps on the calling thread's CPU from now on
        (``follow``), or run on any CPU."""
        if follow:
            cpu = _current_cpu()
            if cpu != self.cpu:
                self._follow(cpu)
        elif self.cpu != affinity.FREE:
            self.release()

    def _follow(self, cpu: int) -> None:
        """Wait between steps on ``cpu``, the CPU of the thread that steps the worker, as an
        idle-priority process; if that is refused, stay free from then on."""
        if cpu < 0 or not self._may_follow or self._gone():
            return
        if not affinity.pin(self.pid, cpu, first=self.cpu < 0):
            self._may_follow = False
            self.cpu = affinity.UNKNOWN  # half of the pin may have been done
            self.release()
            return
        self.cpu = cpu

    def release(self) -> None:
        """Undo :meth:`_follow`: every CPU again, for the worker and what it started."""
        if self.cpu == affinity.FREE:
            return
        self.cpu = affinity.FREE
        if not self._gone():
            affinity.release(self.cgroup.pids() if self.cgroup is not None else (self.pid,))

    def _gone(self) -> bool:
        """The worker exited (or cannot be told from a process that took its pid since)."""
        pidfd = self.pidfd
        if not self.alive or pidfd is None:
            return True
        try:
            return bool(select.select((pidfd,), (), (), 0)[0])
        except (OSError, ValueError):  # closed meanwhile, by a close() in another thread
            return True

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
            close_all(fds)
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

    def stop(self) -> None:
        """SIGSTOP the worker and everything it started, at once: none of it runs again,
        and :meth:`kill` ends them later (their exits, which tear down their memory, then do
        not run beside the code that follows). Without a cgroup to find them all in, they
        are killed now instead."""
        with self._kill_lock:
            if not self.alive:
                return
            if self.cgroup is None or self.pid <= 0:
                self._signal_tree()
                return
            self._park_copies()
            self.cgroup.stop()

    def _park_copies(self) -> None:
        for copy, parking, wakes in self._unparked:
            if copy.wakes != wakes:
                continue
            # Out of the cgroup about to be killed; and a copy still in the making is below
            # this worker in the tree, so its pid must be known to be spared.
            if copy.park(parking) and copy.pid is not None:
                self._copy_pids.add(copy.pid)
        self._unparked.clear()

    def _signal_tree(self) -> None:
        self._park_copies()
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
        close_all(self.inbox.fds)
        self.inbox.fds = []


__all__ = ["START_TIMEOUT_S", "WorkerProcess"]
