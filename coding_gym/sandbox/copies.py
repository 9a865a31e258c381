"""Copies of a worker's interpreter: snapshots, forks, and frozen copies woken as workers.

Runs in the worker (standard library only). A copy is a fork of the worker, so it holds the
interpreter exactly (variables, imports, the state of ``random``) and shares its memory
copy-on-write.

- A *frozen copy* (a snapshot) waits on a socket whose other end the parent holds. It exits
  when the parent closes that end, also when the parent's process dies.
- Each time the parent wakes it, sending a control socket and two output pipes, it forks a new
  live worker that talks over them. One copy can be restored any number of times.
- Copies leave the worker's process tree, which the parent kills as a whole: a double fork
  with the child-subreaper flag off hands them to the worker's own subreaper ancestor (the
  zygote, which reaps them and reports their exit status) or to init.

Two forks are costly, so neither waits on the other where it need not: a snapshot replies as
soon as the first fork exists (the intermediate makes the copy while the worker carries on, and
the worker reaps it before its next command), and once woken, a frozen copy keeps one
intermediate forked ahead, so the wake-ups after the first cost a single fork. (Not before
the first: the parent moves the copy into its parking cgroup only then, and an intermediate
forked earlier would be left in the cgroup of the worker, and killed with it.)
"""

from __future__ import annotations

import _signal
import fcntl
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from coding_gym.sandbox import isolation
from coding_gym.sandbox.protocol import Channel

_SAFE_FD_BASE = 100
_PR_SET_CHILD_SUBREAPER = 36
_SIGCHLD = int(signal.SIGCHLD)
_SIG_DFL = int(signal.SIG_DFL)
_set_handler = _signal.signal
_fork = os.fork
_exit = os._exit


class Copies:
    """The copy commands of :class:`coding_gym.sandbox.worker.Worker`, which mixes this in."""

    channel: Channel
    _fd_out: int
    _fd_err: int
    #: Set by isolation.apply in a live worker; a frozen copy is none, or the workers it forks
    #: would stay its children instead of going to the zygote.
    _subreaper: bool = True
    #: An intermediate process still making a copy (0: none), and what to put back after it.
    _intermediate = 0
    _after_intermediate: tuple[bool, Any] = (False, None)
    copy_error = ""

    if TYPE_CHECKING:
        def _flush(self) -> None: ...

        def _send_ready(self) -> None: ...

    def snapshot(self, reusable: bool) -> int | None:
        """Leave a frozen copy behind: the parent's end of its wake-up socket, -1 on failure
        (``copy_error`` says why), or None in a new worker woken from the copy.

        ``reusable`` (a snapshot the parent keeps, perhaps for many restores): return while
        the copy is still in the making. Otherwise (the copy of a transactional step) the
        copy is made before agent code runs again, with this worker a subreaper all along.
        """
        self.copy_error = ""
        self._flush()  # nothing buffered may be written twice
        mine, theirs = socket.socketpair()
        # The parent learns the copy's pid from the kernel, not from what the copy says.
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            in_copy = self._detached_fork(wait=not reusable)
        except OSError as e:
            mine.close()
            theirs.close()
            self.copy_error = f"could not fork the interpreter: {e}"
            return -1
        if not in_copy:
            mine.close()
            return theirs.detach()
        theirs.close()
        self._freeze(Channel(mine))
        return None

    def fork_into(self, fds: list[int]) -> bool:
        """Fork a live copy that serves another env over ``fds``; True in the copy."""
        self.copy_error = ""
        self._flush()
        try:
            in_copy = self._detached_fork(wait=True)
        except OSError as e:
            self.copy_error = f"could not fork the interpreter: {e}"
            return False
        if in_copy:
            self.channel.close()
            self.take_channels(fds)
        return in_copy

    def settle(self) -> None:
        """Reap the intermediate of the last snapshot, and become a subreaper again."""
        if self._intermediate:
            pid, self._intermediate = self._intermediate, 0
            subreaper, sigchld = self._after_intermediate
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            if subreaper:
                _set_subreaper(True)
            _restore_handler(_SIGCHLD, sigchld)

    def take_channels(self, fds: list[int]) -> None:
        """Become a worker talking over ``fds`` = [control socket, stdout, stderr]."""
        control, out, err = fds
        os.dup2(out, 1)
        os.dup2(err, 2)
        os.close(out)
        os.close(err)
        self._fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self._fd_err = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self.channel = Channel(socket.socket(fileno=control))
        # The one start-up setting a fork does not inherit; the rest of the isolation
        # (namespaces, uid, limits, seccomp) carries over from the process we copy.
        self._subreaper = isolation.become_subreaper()
        self._send_ready()

    def _freeze(self, wake: Channel) -> None:
        """Wait, holding the interpreter as it was; fork a new worker each time the parent
        asks. Returns only in such a new worker; exits when the parent lets go."""
        self.channel.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        for fd in (devnull, self._fd_out, self._fd_err):
            os.close(fd)
        # The agent's SIGCHLD handler must not run here; the woken workers get it back.
        sigchld = _set_handler(_SIGCHLD, _SIG_DFL)
        state = (_random_state(), sigchld)
        try:
            wake.send({"type": "frozen", "pid": os.getpid()})
            spare: tuple[int, socket.socket] | None = None
            while True:
                request, fds = wake.recv()
                if request is None:
                    _exit(0)
                if request.get("cmd") == "wake" and len(fds) == 3:
                    if spare is None:
                        made = self._spare(wake, state, fds)
                        if made is True:
                            return  # in a new worker
                        spare = made or None
                    if spare is not None:
                        pid, sock = spare
                        try:
                            socket.send_fds(sock, [b"w"], fds)
                        except OSError:
                            pass  # the parent sees the control socket close, no worker
                        sock.close()
                        for fd in fds:
                            os.close(fd)
                        fds = []
                        os.waitpid(pid, 0)
                    made = self._spare(wake, state, fds)  # for the next wake-up
                    if made is True:
                        return
                    spare = made or None
                for fd in fds:
                    os.close(fd)
        except BaseException:  # noqa: BLE001 - a frozen copy never returns by accident
            _exit(1)

    def _spare(self, wake: Channel, state: tuple[Any, Any], inherited: list[int]
               ) -> tuple[int, socket.socket] | bool | None:
        """Fork the intermediate that will fork the next woken worker: (its pid, a socket to
        it) in the frozen copy; True in the woken worker; None if the fork failed.

        ``inherited``: fds the frozen copy holds that the intermediate must not keep.
        """
        ours, theirs = socket.socketpair()
        try:
            pid = _fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid:
            theirs.close()
            return pid, ours
        try:
            for fd in inherited:
                os.close(fd)
            ours.close()
            wake.close()
            _, fds, _, _ = socket.recv_fds(theirs, 16, 3)
            if len(fds) != 3 or _fork():
                _exit(0)
            theirs.close()
            os.setsid()
            random_state, sigchld = state
            _set_random_state(random_state)
            _restore_handler(_SIGCHLD, sigchld)
            self.take_channels(fds)
        except BaseException:  # noqa: BLE001 - never return into the loop from here
            _exit(1)
        return True

    def _detached_fork(self, wait: bool) -> bool:
        """Fork a copy of this interpreter that is not our child: True in the copy.

        With the subreaper flag off until the intermediate has exited, its orphan skips this
        process on the way up. Without ``wait`` that happens later, in :meth:`settle`.
        """
        self.settle()
        random_state = _random_state()
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
                os.setsid()
                _set_random_state(random_state)
                _restore_handler(_SIGCHLD, sigchld)
            except BaseException:  # noqa: BLE001 - never return into the loop from here
                _exit(1)
            self._subreaper = False  # not inherited across fork
            return True
        self._intermediate, self._after_intermediate = pid, (subreaper, sigchld)
        if wait:
            self.settle()
        return False


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


_libc_prctl: Any = None


def _set_subreaper(on: bool) -> None:
    global _libc_prctl
    try:
        if _libc_prctl is None:
            import ctypes

            _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
        _libc_prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    except (OSError, AttributeError):
        pass
