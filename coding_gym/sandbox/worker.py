"""The sandbox worker: runs an episode's code, one request at a time, top to bottom.

Started by :class:`coding_gym.sandbox.supervisor.WorkerProcess`, either as a fresh
``sys.executable`` (:func:`main`) or forked from the zygote (:func:`start`). Its fds 1 and 2 are
pipes the parent drains (so output of C code, ``os.system`` and child processes is captured);
fd 0 is /dev/null; requests and replies travel over a socket (see ``protocol.py``), which also
carries file descriptors for the commands that hand the interpreter to a new process.
Variables live in one namespace for the whole episode.

Copies (snapshots, forks) are made here, by forking this process: a *frozen copy* is a fork
that waits on a socket of its own, and each time the parent wakes it, it forks again into a
new live worker with the parent's fresh pipes. Copies leave this worker's process tree (the
parent kills that tree as a whole) through a double fork.

Only the standard library is imported here, and the names the worker relies on are bound at
import time, so code that monkeypatches ``os``, ``json`` or ``builtins`` cannot break the loop.
If it still manages to, the parent sees a dead or incoherent worker and replaces it.
"""

from __future__ import annotations

import _signal
import array
import builtins
import collections
import fcntl
import io
import json
import linecache
import os
import resource
import signal
import socket
import sys
import termios
import time
import traceback
import types
from collections.abc import Mapping, Sequence
from typing import Any

from coding_gym.sandbox import isolation, protocol

_SAFE_FD_BASE = 100
#: Code objects of recent programs, kept so that a program sent again is not compiled again.
_COMPILED_CACHE = 64
_RECV_BYTES = 1 << 16
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)
_PR_SET_CHILD_SUBREAPER = 36
_perf_counter = time.perf_counter
_process_time = time.process_time
_getrusage = resource.getrusage
_RUSAGE_CHILDREN = resource.RUSAGE_CHILDREN
# The C functions themselves: signal.signal's enum conversions cost ~10 µs a call.
_setitimer = _signal.setitimer
_set_handler = _signal.signal
_ITIMER_REAL = signal.ITIMER_REAL
_ITIMER_PROF = signal.ITIMER_PROF
_SIGALRM = int(signal.SIGALRM)
_SIGPROF = int(signal.SIGPROF)
_SIGCHLD = int(signal.SIGCHLD)
_SIG_DFL = int(signal.SIG_DFL)
_dup2 = os.dup2
_ioctl = fcntl.ioctl
_FIONREAD = termios.FIONREAD
_fork = os.fork
_exit = os._exit
_loads = json.loads
_encode = protocol.encode
_decode_run = protocol.decode_run
_encode_result = protocol.encode_result
_CodeType = types.CodeType
_format_exception_only = traceback.format_exception_only


class StepTimeout(BaseException):
    """Raised inside the step's code when it exceeds its time limit.

    A BaseException, so ``except Exception`` in the agent's code does not swallow it.
    """


StepTimeout.__module__ = "builtins"  # tracebacks show "StepTimeout: ...", not the worker path


def _cpu_seconds() -> float:
    children = _getrusage(_RUSAGE_CHILDREN)
    return _process_time() + children.ru_utime + children.ru_stime


def _exit_status(code: object) -> tuple[int, str]:
    """Map ``SystemExit.code`` like the interpreter does: (status, text for stderr)."""
    if code is None:
        return 0, ""
    if isinstance(code, int) and not isinstance(code, bool):
        return code % 256, ""
    return 1, f"{code}\n"


class _Channel:
    """The worker's end of a socket: length-prefixed JSON messages, with fds alongside."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()
        self._fds: list[int] = []

    def recv(self) -> tuple[dict[str, Any] | None, list[int]]:
        """The next message and the fds that came with it; (None, []) when the peer is gone."""
        buffer = self._buffer
        while True:
            if len(buffer) >= protocol.HEADER.size:
                end = protocol.HEADER.size + protocol.HEADER.unpack_from(buffer)[0]
                if len(buffer) >= end:
                    body = bytes(buffer[protocol.HEADER.size:end])
                    message = _decode_run(body) if body[:1] == b"R" else _loads(body)
                    del buffer[:end]
                    fds, self._fds = self._fds, []
                    return (message if isinstance(message, dict) else {}), fds
            data, ancillary, _, _ = self.sock.recvmsg(_RECV_BYTES, _FD_SPACE)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[:len(payload) - len(payload) % received.itemsize])
                    self._fds.extend(received)
            if not data:
                return None, []
            buffer += data

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        if message["type"] == "result":
            data = _encode_result(message["exit_code"], message["kill_reason"],
                                  message["wall_ns"], message["cpu_ns"], message["out"],
                                  message["err"])
        else:
            data = _encode(message)
        if fds:
            sent = self.sock.sendmsg(
                [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
            )
            data = data[sent:]
        if data:
            self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


class Worker:
    """The command loop and the namespace of one episode."""

    def __init__(self, sock: socket.socket, isolation_report: Mapping[str, Any] | None = None
                 ) -> None:
        self.channel = _Channel(sock)
        self.isolation_report = dict(isolation_report or {})
        # The episode's namespace is a real __main__ module, so pickle and multiprocessing
        # find the classes and functions the agent defines.
        main_module = types.ModuleType("__main__")
        main_module.__builtins__ = builtins  # type: ignore[attr-defined]
        sys.modules["__main__"] = main_module
        sys.argv = [""]
        self.namespace: dict[str, Any] = main_module.__dict__
        self.cell = 0
        self.timeout_s = 0.0
        self._in_step = False
        self._on_timer_handler = self._on_timer  # one bound method, installed every step
        # Set by isolation.apply in a live worker; a frozen copy must not be one, or the
        # workers it forks would stay its children instead of going to the zygote.
        self._subreaper = True
        self._builtins = dict(builtins.__dict__)
        self._compiled: collections.OrderedDict[str, types.CodeType] = collections.OrderedDict()
        self._fflush: Any = None
        # Private close-on-exec copies of the output pipes: agent code may close or redirect
        # fds 1 and 2, and they are put back before every step.
        self._fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self._fd_err = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                       errors="backslashreplace")
        self.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                       errors="backslashreplace", line_buffering=True)

    def serve(self) -> None:
        """Answer requests until the parent closes the socket."""
        self._send_ready()
        while True:
            request, fds = self.channel.recv()
            if request is None:
                return
            command = request.get("cmd")
            reply_fds: list[int] = []
            if command == "run":
                if request.get("snapshot"):
                    # Transactional step: a frozen copy of the state before the step, woken by
                    # the parent if the step has to be rolled back.
                    wake = self._snapshot_or_report()
                    if wake is None:
                        continue  # in the copy, woken in place of this step's worker
                    self.channel.send({"type": "snapshot"} if wake >= 0 else
                                      {"type": "snapshot", "error": self._copy_error},
                                      [wake] if wake >= 0 else ())
                    if wake >= 0:
                        os.close(wake)
                reply = self._run_request(request)
            elif command == "snapshot":
                wake = self._snapshot_or_report()
                if wake is None:
                    continue
                if wake >= 0:
                    reply, reply_fds = {"type": "snapshot"}, [wake]
                else:
                    reply = {"type": "error", "message": self._copy_error}
            elif command == "fork":
                if len(fds) == 3 and self._fork_into(fds):
                    continue  # in the copy, now the worker of another env
                reply = ({"type": "forked"} if len(fds) == 3 and not self._copy_error else
                         {"type": "error", "message": self._copy_error or "expected 3 fds"})
            elif command == "ping":
                reply = {"type": "pong"}
            else:
                reply = {"type": "error", "message": f"unknown command {command!r}"}
            for fd in fds:
                os.close(fd)
            self.channel.send(reply, reply_fds)
            for fd in reply_fds:
                os.close(fd)

    def _send_ready(self) -> None:
        self.channel.send({"type": "ready", "pid": os.getpid(),
                           "isolation": self.isolation_report})

    def _run_request(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return self.run(str(request["code"]), float(request["timeout_s"]))
        except StepTimeout:
            # The timer fired in the instant between the code's end and its disarming.
            return {"type": "result", "exit_code": 1, "kill_reason": "timeout",
                    "wall_ns": int(self.timeout_s * 1e9), "cpu_ns": 0, "out": -1, "err": -1}

    def _on_timer(self, signum: int, frame: object) -> None:
        if self._in_step:
            raise StepTimeout(
                f"step exceeded its {self.timeout_s:g} s time limit; "
                "the interpreter and its variables were kept"
            )

    def _restore_streams(self) -> None:
        _dup2(self._fd_out, 1)
        _dup2(self._fd_err, 2)
        sys.stdout, sys.stderr, sys.stdin = self.stdout, self.stderr, sys.__stdin__
        _set_handler(_SIGALRM, self._on_timer_handler)
        _set_handler(_SIGPROF, self._on_timer_handler)

    def run(self, code: str, timeout_s: float) -> dict[str, Any]:
        self._restore_streams()
        self.cell += 1
        compiled = self._compiled.get(code)
        if compiled is None:
            filename = f"<cell-{self.cell}>"
            linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        else:
            # The same program again (agents with a fixed set of snippets do that every
            # step): its code object still points at the cell that first ran it.
            filename = compiled.co_filename
        exit_code, kill_reason = 0, None
        self.timeout_s = timeout_s
        cpu_start, wall_start = _cpu_seconds(), _perf_counter()
        try:
            self._in_step = True
            # A wall timer stops sleeps and loops; a CPU timer stops busy threads sooner.
            _setitimer(_ITIMER_REAL, timeout_s)
            _setitimer(_ITIMER_PROF, timeout_s)
            try:
                if compiled is None:
                    compiled = compile(code, filename, "exec", dont_inherit=True)
                    self._remember(code, compiled)
                exec(compiled, self.namespace)
            finally:
                # First thing: from here on a late timer signal is ignored.
                self._in_step = False
                _setitimer(_ITIMER_REAL, 0)
                _setitimer(_ITIMER_PROF, 0)
        except SystemExit as e:
            exit_code, message = _exit_status(e.code)
            self._write_stderr(message)
        except BaseException as e:
            exit_code = 1
            if isinstance(e, StepTimeout):
                kill_reason = "timeout"
            elif isinstance(e, MemoryError):
                kill_reason = "memory"
            self._write_stderr(self._format_traceback(e))
        wall = _perf_counter() - wall_start
        self._finish_step()
        if compiled is None:
            linecache.cache.pop(filename, None)  # a syntax error: nothing refers to it
        return {
            "type": "result",
            "exit_code": exit_code,
            "kill_reason": kill_reason,
            "wall_ns": int(wall * 1e9),
            "cpu_ns": max(0, int((_cpu_seconds() - cpu_start) * 1e9)),
            # What the step left in the output pipes: the parent reads that much, and spares
            # the reads that would find an empty pipe.
            "out": _pending(self._fd_out),
            "err": _pending(self._fd_err),
        }

    def _remember(self, code: str, compiled: types.CodeType) -> None:
        """Keep the code object of a program for its next run, within a small cache.

        A cell's lines stay in linecache while something may still show them in a
        traceback: its cached code object, or functions and classes it defined. The others
        leave, or the lines of every step would grow memory, step after step.
        """
        cache = self._compiled
        cache[code] = compiled
        if len(cache) > _COMPILED_CACHE:
            old_code, old = cache.popitem(last=False)
            if not any(type(c) is _CodeType for c in old.co_consts):
                linecache.cache.pop(old.co_filename, None)

    def _finish_step(self) -> None:
        """Undo what the step may have broken, and push its output into the pipes."""
        bd = builtins.__dict__
        bd.clear()
        bd.update(self._builtins)
        self._flush()

    def _flush(self) -> None:
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
            self._flush_c_stdio()

    def _flush_c_stdio(self) -> None:
        """Flush C-level stdio buffers (printf from ctypes or extensions) into the pipes."""
        try:
            if self._fflush is None:
                import ctypes

                self._fflush = ctypes.CDLL(None).fflush
            self._fflush(None)
        except (OSError, AttributeError):
            pass

    def _write_stderr(self, text: str) -> None:
        if not text:
            return
        try:
            self.stderr.write(text)
        except BaseException:  # noqa: BLE001 - fd 2 closed by the agent: restored next step
            pass

    @staticmethod
    def _format_traceback(error: BaseException) -> str:
        """The traceback of the agent's code alone: the worker's frames are left out."""
        try:
            tb = error.__traceback__
            while tb is not None and not tb.tb_frame.f_code.co_filename.startswith("<cell-"):
                tb = tb.tb_next
            if tb is None:
                return "".join(_format_exception_only(type(error), error))
            report = traceback.TracebackException(type(error), error, tb)
            report.stack = traceback.StackSummary.from_list(
                [frame for frame in report.stack if frame.filename != __file__]
            )
            return "".join(report.format())
        except BaseException:  # noqa: BLE001 - a hostile __str__ or patched traceback module
            return f"{type(error).__name__}: <exception could not be formatted>\n"

    # Copies: snapshots, forks and the frozen copies that wake up as new workers.

    _copy_error = ""

    def _snapshot_or_report(self) -> int | None:
        """Leave a frozen copy behind: the parent's end of its wake-up socket, -1 on failure
        (``_copy_error`` says why), or None in a new worker woken from the copy."""
        self._copy_error = ""
        self._flush()  # nothing buffered may be written twice
        mine, theirs = socket.socketpair()
        # The parent learns the copy's pid from the kernel, not from what the copy says.
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        try:
            in_copy = self._detached_fork()
        except OSError as e:
            mine.close()
            theirs.close()
            self._copy_error = f"could not fork the interpreter: {e}"
            return -1
        if not in_copy:
            mine.close()
            return theirs.detach()
        theirs.close()
        self._freeze(_Channel(mine))
        return None

    def _fork_into(self, fds: list[int]) -> bool:
        """Fork a live copy that serves another env over ``fds``; True in the copy."""
        self._copy_error = ""
        self._flush()
        try:
            in_copy = self._detached_fork()
        except OSError as e:
            self._copy_error = f"could not fork the interpreter: {e}"
            return False
        if in_copy:
            self.channel.close()
            self._take_channels(fds)
        return in_copy

    def _freeze(self, wake: _Channel) -> None:
        """Wait, holding the interpreter as it was; fork a new worker each time the parent
        asks. Returns only in such a new worker; exits when the parent lets go."""
        self.channel.close()
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            _dup2(devnull, fd)
        for fd in (devnull, self._fd_out, self._fd_err):
            os.close(fd)
        try:
            wake.send({"type": "frozen", "pid": os.getpid()})
            while True:
                request, fds = wake.recv()
                if request is None:
                    _exit(0)
                if request.get("cmd") == "wake" and len(fds) == 3:
                    try:
                        if self._detached_fork():
                            wake.close()
                            self._take_channels(fds)
                            return
                    except OSError:
                        pass  # the parent sees the control socket close without a worker
                for fd in fds:
                    os.close(fd)
        except BaseException:  # noqa: BLE001 - a frozen copy never returns by accident
            _exit(1)

    def _take_channels(self, fds: list[int]) -> None:
        """Become a worker talking over ``fds`` = [control socket, stdout, stderr]."""
        control, out, err = fds
        _dup2(out, 1)
        _dup2(err, 2)
        os.close(out)
        os.close(err)
        self._fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self._fd_err = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self.channel = _Channel(socket.socket(fileno=control))
        # The one start-up setting a fork does not inherit; the rest of the isolation
        # (namespaces, uid, limits, seccomp) carries over from the process we copy.
        self._subreaper = isolation.become_subreaper()
        self._send_ready()

    def _detached_fork(self) -> bool:
        """Fork a copy of this interpreter that is not our child: True in the copy.

        The parent kills a worker's process tree as a whole, and a copy must survive that.
        With the subreaper flag off for a moment, the double fork hands the copy to our own
        subreaper ancestor (the zygote, which reports its exit status) or to init. The copy
        keeps the state of ``random``, which a plain fork would reseed: a snapshot restores
        the interpreter exactly.
        """
        try:
            random_state = sys.modules["random"].getstate() if "random" in sys.modules else None
        except Exception:  # noqa: BLE001 - the agent's own business if it broke random
            random_state = None
        # waitpid below needs the default disposition: with SIGCHLD ignored (agent code may
        # have done so) it would wait for every child instead.
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
                if random_state is not None:
                    sys.modules["random"].setstate(random_state)
                _restore_handler(_SIGCHLD, sigchld)
            except BaseException:  # noqa: BLE001 - never return into the loop from here
                _exit(1)
            self._subreaper = False  # not inherited across fork
            return True
        try:
            # Only once the intermediate is gone may the flag come back: its orphan must
            # skip this process on the way up.
            _, status = os.waitpid(pid, 0)
        finally:
            if subreaper:
                _set_subreaper(True)
            _restore_handler(_SIGCHLD, sigchld)
        if status != 0:
            raise OSError(f"the intermediate process failed with status {status}")
        return False


_libc_prctl: Any = None
_pending_count = array.array("i", [0])


def _pending(fd: int) -> int:
    """Bytes waiting to be read in the pipe behind ``fd``; -1 if that cannot be known."""
    try:
        _ioctl(fd, _FIONREAD, _pending_count, True)
    except OSError:
        return -1
    return _pending_count[0]


def _restore_handler(signum: int, handler: Any) -> None:
    if handler is not None:  # None: installed by C code, which Python cannot put back
        _set_handler(signum, handler)


def _set_subreaper(on: bool) -> None:
    global _libc_prctl
    try:
        if _libc_prctl is None:
            import ctypes

            _libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
        _libc_prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _batch_scheduling() -> None:
    """Run as a batch process: woken by a request, the worker waits for the parent to block
    instead of preempting it in the middle of sending requests to its other workers."""
    try:
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except (OSError, AttributeError):
        pass


def warm_up() -> None:
    """Run the step machinery once, so the first real step is not ~1.5 ms slower."""
    filename = "<cell-0>"
    linecache.cache[filename] = (8, None, ["x = 1/0\n"], filename)
    scratch: dict[str, Any] = {"__builtins__": builtins}
    try:
        exec(compile("x = 1/0\n", filename, "exec", dont_inherit=True), scratch)
    except ZeroDivisionError as e:
        Worker._format_traceback(e)
    _setitimer(_ITIMER_REAL, 0)
    _cpu_seconds()
    del linecache.cache[filename]


def start(sock: socket.socket, config: Mapping[str, Any]) -> None:
    """Isolate this process, then serve: the common path after spawn and after fork.

    ``config`` comes from :func:`coding_gym.sandbox.isolation.worker_config`.
    """
    worker = Worker(sock)
    _batch_scheduling()
    # Also after a fork from a warm zygote: the first step would take the copy-on-write faults.
    warm_up()
    try:
        worker.isolation_report = dict(isolation.apply(config))
    except Exception as e:  # noqa: BLE001 - tell the parent why, then stop
        worker.channel.send({"type": "error", "message": f"{type(e).__name__}: {e}"})
        return
    worker.serve()


def main(argv: list[str]) -> None:
    """Entry point of a spawned worker: ``argv`` is [control socket fd, config as JSON]."""
    start(socket.socket(fileno=int(argv[0])), json.loads(argv[1]))
