"""Copies of a worker's interpreter: snapshots, forks, and frozen copies woken as workers.

Runs in the worker (standard library only). A copy is a fork of the worker, so it holds the
interpreter exactly (variables, imports, the state of ``random``) and shares its memory
copy-on-write.

- A *frozen copy* (a snapshot) waits on a socket whose other end the parent holds. It exits
  when the parent closes that end, also when the parent's process dies.
- Woken by the parent, which sends a control socket and two output pipes, it becomes the live
  worker that talks over them, then forks its successor, which waits on the socket in its
  place: a snapshot can be restored any number of times, without waiting for a fork.
- Copies leave the process tree of the worker, which the parent kills as a whole. They are
  forked *beside* the process they copy (``clone`` with ``CLONE_PARENT``): children of its
  parent, the zygote, which reaps them and reports their exit status like those of the workers
  it forks itself. One fork, and nothing to wait for.

Where a copy cannot be forked beside, a double fork does the same for the cost of two forks,
the second one waited for: with the child-subreaper flag off until the intermediate has
exited, its orphan skips this process on the way up to the zygote (or to init). That is the
way for a worker the env spawned (its parent is the env's process, which reaps only the
workers it started), for a worker running threads (only the C library's ``fork`` leaves
locks held by other threads, malloc's among them, usable in the child) and where ``clone``
fails or its number is not known.
"""

from __future__ import annotations

import _signal
import ctypes
import os
import platform
import signal
import socket
import struct
import sys
from typing import TYPE_CHECKING, Any

from coding_gym.sandbox import isolation
from coding_gym.sandbox.libc import libc
from coding_gym.sandbox.protocol import Channel
from coding_gym.sandbox.streams import StepStreams

_PR_SET_CHILD_SUBREAPER = 36
_CLONE_PARENT = 0x00008000
#: clone's number on the architectures where its first argument is the flags.
_SYS_CLONE = {"x86_64": 56, "aarch64": 220}.get(platform.machine())
_UCRED = struct.Struct("3i")
_SIGCHLD = int(signal.SIGCHLD)
_SIG_DFL = int(signal.SIG_DFL)
_set_handler = _signal.signal
_fork = os.fork
_exit = os._exit
_listdir = os.listdir
_SCHED_OTHER = os.SCHED_OTHER


class Copies:
    """The copy commands of :class:`coding_gym.sandbox.worker.Worker`, which mixes this in."""

    channel: Channel
    streams: StepStreams
    #: Set by isolation.apply in a live worker; a frozen copy is none, or the workers it forks
    #: would stay its children instead of going to the zygote.
    _subreaper: bool = True
    copy_error = ""
    #: The scheduling policy of the worker a frozen copy was made of.
    _policy = -1
    #: A snapshot was made: the worker takes its policy back once its reply is sent.
    _unsettled = False

    if TYPE_CHECKING:
        def _send_ready(self) -> None: ...

    def snapshot(self, reusable: bool) -> int | None:
        """Leave a frozen copy behind: the parent's end of its wake-up socket, -1 on failure
        (``copy_error`` says why), or None in a new worker woken from the copy.

        ``reusable``: a snapshot the parent keeps, perhaps for many restores, not the copy of
        a transactional step, which is woken only if the step fails.
        """
        self.copy_error = ""
        self.streams.flush()  # nothing buffered may be written twice
        mine, theirs = socket.socketpair()
        # The parent learns the copy's pid from the kernel, not from what the copy says.
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # A snapshot, and the successors it forks, run under the default scheduling policy,
        # whatever the worker's (idle-priority while it follows its caller, see affinity.py):
        # a restore waits for them to start or wake, and at a busy CPU an idle-priority or
        # batch process does either late. (The copy of a transactional step stays out of the
        # way of the step.) The workers they become take the worker's policy back.
        self._policy = _scheduling_policy()
        if reusable:
            _set_policy(_SCHED_OTHER)
        try:
            in_copy = self._detached_fork(beside=self._parent_reaps())
        except OSError as e:
            _set_policy(self._policy)
            mine.close()
            theirs.close()
            self.copy_error = f"could not fork the interpreter: {e}"
            return -1
        if not in_copy:
            mine.close()
            self._unsettled = reusable
            return theirs.detach()
        theirs.close()
        self._freeze(Channel(mine))
        return None

    def settle(self) -> None:
        """Back to the worker's scheduling policy after a snapshot, its reply sent: not sooner,
        or under a weaker policy it would yield its CPU to the copy until that has frozen
        (~1 ms)."""
        if self._unsettled:
            self._unsettled = False
            _set_policy(self._policy)

    def fork_into(self, fds: list[int]) -> bool:
        """Fork a live copy that serves another env over ``fds``; True in the copy."""
        self.copy_error = ""
        self.streams.flush()
        try:
            in_copy = self._detached_fork(beside=self._parent_reaps())
        except OSError as e:
            self.copy_error = f"could not fork the interpreter: {e}"
            return False
        if in_copy:
            # Nothing of the other env's may stay open here: its control socket, and its
            # output pipes, into which this env's code could otherwise write.
            self.channel.close()
            self.streams.close()
            self.take_channels(fds)
        return in_copy

    def take_channels(self, fds: list[int]) -> None:
        """Become a worker talking over ``fds`` = [control socket, stdout, stderr]."""
        self._attach(fds)
        self._send_ready()

    def _attach(self, fds: list[int]) -> None:
        """:meth:`take_channels` but for the ready message."""
        control, out, err = fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self.streams = StepStreams()
        self.channel = Channel(socket.socket(fileno=control))
        # The one start-up setting a fork does not inherit; the rest of the isolation
        # (namespaces, uid, limits, seccomp) carries over from the process we copy.
        self._subreaper = isolation.become_subreaper()

    def _parent_reaps(self) -> bool:
        """Whether our parent reaps children it did not start, so that a copy may be its child:
        the zygote and init do; the env's process, which spawned this worker, does not."""
        try:
            peer = self.channel.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                _UCRED.size)
        except OSError:
            return False
        return _UCRED.unpack(peer)[0] != os.getppid()

    def _freeze(self, wake: Channel) -> None:
        """Hold the interpreter as it is until the parent wakes the copy, then become the
        worker it asks for. Returns only in that worker; exits when the parent lets go.

        Woken to be restored again later, the new worker forks its *successor* once it is
        ready, so a restore does not wait for a fork. The successor freezes in its place (on
        the same socket, introducing itself again), and the parent parks it before it next
        kills the worker's cgroup. The worker reads its first request once the successor
        has left its process group (the parent kills a worker's group, and agent code may
        too). A fork that fails ends the snapshot.
        """
        while True:
            try:
                self._introduce(wake)  # first: a restore waits for it
                sigchld = self._go_quiet()
                while True:
                    request, fds = wake.recv()
                    if request is None:
                        _exit(0)
                    if request.get("cmd") == "wake" and len(fds) == 3:
                        break
                    for fd in fds:
                        os.close(fd)
            except BaseException:  # noqa: BLE001 - a frozen copy never returns by accident
                _exit(1)
            _restore_handler(_SIGCHLD, sigchld)
            self._attach(fds)
            self._send_ready()
            _set_policy(self._policy)  # after the reply: see settle
            if not request.get("again") or not self._leave_successor():
                break
            _set_policy(_SCHED_OTHER)  # the successor: frozen as its predecessor was
        wake.close()  # the successor's now, if there is one

    def _leave_successor(self) -> bool:
        """Fork the successor: True in it; in the worker, False once it has left our process
        group (or could not be forked)."""
        gone, leaving = os.pipe()
        if self._fork_successor(leaving):
            os.close(gone)
            return True
        os.close(leaving)
        os.read(gone, 1)  # nothing to read: returns once the successor closed its end
        os.close(gone)
        return False

    @staticmethod
    def _introduce(wake: Channel) -> None:
        """Say the copy exists; the parent takes its pid from the kernel, with the message."""
        wake.send({"type": "frozen", "pid": os.getpid()})

    def _go_quiet(self) -> Any:
        """Let go of the worker's channels; return the agent's SIGCHLD handler, which must
        not run while the copy is frozen (its workers get it back)."""
        self.channel.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        self.streams.close()
        return _set_handler(_SIGCHLD, _SIG_DFL)

    def _fork_successor(self, leaving: int) -> bool:
        """Fork the next frozen copy: True in it, where ``leaving`` is closed once it has
        left our process group. This copy's parent is the zygote (or init), which reaps what
        is forked beside the copy."""
        try:
            return self._detached_fork(beside=True, leaving=leaving)
        except OSError:
            return False

    def _detached_fork(self, beside: bool, leaving: int = -1) -> bool:
        """Fork a copy of this interpreter that is not our child: True in the copy, which
        leads a process group of its own first thing, then closes ``leaving`` (if given). It
        stays in the worker's session, so in its CPU scheduling group (see isolation.py).

        ``beside``: our parent may be the copy's. Otherwise, or where that fails, a double
        fork, whose intermediate is waited for: the copy has left our process tree when this
        returns (or the worker's kill could take it along, with no cgroup to park it in).
        """
        random_state = _random_state()
        pid = _fork_beside(leaving) if beside else None
        if pid is None:
            pid = self._fork_intermediate(leaving)
        if pid == 0:
            try:
                _set_random_state(random_state)
            except BaseException:  # noqa: BLE001 - never return into the loop from here
                _exit(1)
            self._subreaper = False  # not inherited across fork
            return True
        return False

    def _fork_intermediate(self, leaving: int) -> int:
        """The double fork: 0 in the copy, else the intermediate's pid."""
        # waitpid needs the default disposition: with SIGCHLD ignored (agent code may have
        # done so) it would wait for every child instead.
        sigchld = _set_handler(_SIGCHLD, _SIG_DFL)
        subreaper = self._subreaper
        if subreaper:
            _set_subreaper(False)
        try:
            pid = _fork()
        except OSError:
            if subreaper:
                _set_subreaper(True)
            _restore_handler(_SIGCHLD, sigchld)
            raise
        if pid == 0:
            try:
                if _fork():
                    _exit(0)
                os.setpgid(0, 0)
                if leaving >= 0:
                    os.close(leaving)
                _restore_handler(_SIGCHLD, sigchld)
            except BaseException:  # noqa: BLE001 - never return into the loop from here
                _exit(1)
            return 0
        # The intermediate exits at once: once it is reaped, the copy has left our tree.
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        finally:
            if subreaper:
                _set_subreaper(True)
            _restore_handler(_SIGCHLD, sigchld)
        return pid


def _random_state() -> Any:
    """The state of ``random``, which a fork reseeds: a copy must continue its sequence."""
    try:
        return sys.modules["random"].getstate() if "random" in sys.modules else None
    except Exception:  # noqa: BLE001 - the agent's own business if it broke random
        return None


def _set_random_state(state: Any) -> None:
    if state is not None:
        sys.modules["random"].setstate(state)


def _restore_handler(signum: int, handler: Any) -> None:
    if handler is not None:  # None: installed by C code, which Python cannot put back
        _set_handler(signum, handler)


class _Clone:
    """``clone`` through the C library's ``syscall``, between the interpreter's own before-
    and after-fork steps, as ``os.fork`` calls fork (at-fork hooks, import lock, GIL, thread
    states).

    Called with the GIL held (``PyDLL``), as ``os.fork`` calls fork: the child inherits a
    lock it holds, which ``PyOS_AfterFork_Child`` makes anew. Left out are the C library's
    own steps: the locks it takes so that other threads leave them usable (hence one thread
    only), its ``pthread_atfork`` handlers, and the thread id it caches, which keeps the
    parent's value (the C library asks the kernel instead where a thread acts on itself).
    """

    def __init__(self) -> None:
        python = ctypes.PyDLL(None, use_errno=True)
        self.syscall = python.syscall
        self.syscall.restype = ctypes.c_long
        self.syscall.argtypes = [ctypes.c_long] * 6
        self.setpgid = python.setpgid
        self.setpgid.argtypes = [ctypes.c_int, ctypes.c_int]
        self.close = python.close
        self.close.argtypes = [ctypes.c_int]
        self.before = python.PyOS_BeforeFork
        self.after_in_parent = python.PyOS_AfterFork_Parent
        self.after_in_child = python.PyOS_AfterFork_Child
        for function in (self.before, self.after_in_parent, self.after_in_child):
            function.restype = None
            function.argtypes = []

    def fork(self, flags: int, leaving: int) -> int:
        """``os.fork`` with these clone ``flags``: 0 in the child, its pid in the parent.

        The child leads a process group of its own before the interpreter's after-fork steps, whose
        copy-on-write faults take a while, then closes ``leaving`` (if not -1).
        """
        self.before()
        pid = self.syscall(_SYS_CLONE, flags | _SIGCHLD, 0, 0, 0, 0)
        if pid == 0:
            self.setpgid(0, 0)
            if leaving >= 0:
                self.close(leaving)
            self.after_in_child()
            return 0
        number = ctypes.get_errno()
        self.after_in_parent()
        if pid < 0:
            raise OSError(number, f"clone: {os.strerror(number)}")
        return pid


_clone: _Clone | None = None


def _fork_beside(leaving: int = -1) -> int | None:
    """Fork a child of our own parent (0 in it, else its pid), leading a process group of its
    own, closing ``leaving`` once there; None where that cannot be done."""
    global _clone
    if _SYS_CLONE is None:
        return None
    try:
        if len(_listdir("/proc/self/task")) != 1:
            return None
        if _clone is None:
            _clone = _Clone()
        return _clone.fork(_CLONE_PARENT, leaving)
    except (OSError, AttributeError):
        return None


def _scheduling_policy() -> int:
    try:
        return os.sched_getscheduler(0)
    except OSError:
        return -1


def _set_policy(policy: int) -> None:
    if policy >= 0:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))
        except OSError:
            pass  # the process keeps the policy it has


def _set_subreaper(on: bool) -> None:
    try:
        libc().prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    except (OSError, AttributeError):
        pass
