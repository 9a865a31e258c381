"""The sandbox worker: runs an episode's code, one request at a time, top to bottom.

Started by :class:`coding_gym.backends.local.LocalBackend` with ``sys.executable``. Its fds 1
and 2 are pipes the parent drains (so output of C code, ``os.system`` and child processes is
captured); fd 0 is /dev/null; requests and replies travel over a socket (see ``protocol.py``).
Variables live in one namespace for the whole episode.

Only the standard library is imported here, and the names the worker relies on are bound at
import time, so code that monkeypatches ``os``, ``json`` or ``builtins`` cannot break the loop.
If it still manages to, the parent sees a dead or incoherent worker and replaces it.
"""

from __future__ import annotations

import builtins
import fcntl
import io
import linecache
import os
import resource
import signal
import socket
import sys
import time
import traceback
import types
from typing import Any

from coding_gym.sandbox import isolation, protocol

_SAFE_FD_BASE = 100
_perf_counter = time.perf_counter
_getrusage = resource.getrusage
_setitimer = signal.setitimer
_dup2 = os.dup2
_format_exception_only = traceback.format_exception_only


class StepTimeout(BaseException):
    """Raised inside the step's code when it exceeds its time limit.

    A BaseException, so ``except Exception`` in the agent's code does not swallow it.
    """


StepTimeout.__module__ = "builtins"  # tracebacks show "StepTimeout: ...", not the worker path


def _cpu_seconds() -> float:
    own = _getrusage(resource.RUSAGE_SELF)
    children = _getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _exit_status(code: object) -> tuple[int, str]:
    """Map ``SystemExit.code`` like the interpreter does: (status, text for stderr)."""
    if code is None:
        return 0, ""
    if isinstance(code, int) and not isinstance(code, bool):
        return code % 256, ""
    return 1, f"{code}\n"


class Worker:
    """The command loop and the namespace of one episode."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
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
        self._builtins = dict(builtins.__dict__)
        # Private close-on-exec copies of the output pipes: agent code may close or redirect
        # fds 1 and 2, and they are put back before every step.
        self._fd_out = fcntl.fcntl(1, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self._fd_err = fcntl.fcntl(2, fcntl.F_DUPFD_CLOEXEC, _SAFE_FD_BASE)
        self.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                       errors="backslashreplace")
        self.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                       errors="backslashreplace", line_buffering=True)

    def warm_up(self) -> None:
        """Run the step machinery once, so the first real step is not ~1.5 ms slower."""
        filename = "<cell-0>"
        linecache.cache[filename] = (8, None, ["x = 1/0\n"], filename)
        scratch: dict[str, Any] = {"__builtins__": builtins}
        try:
            exec(compile("x = 1/0\n", filename, "exec", dont_inherit=True), scratch)
        except ZeroDivisionError as e:
            self._format_traceback(e)
        _setitimer(signal.ITIMER_REAL, 0)
        _cpu_seconds()
        del linecache.cache[filename]

    def serve(self) -> None:
        protocol.send(self.sock, {"type": "ready", "pid": os.getpid()})
        while True:
            request = protocol.recv(self.sock)
            if request is None:
                return
            command = request.get("cmd")
            if command == "run":
                try:
                    reply = self.run(str(request["code"]), float(request["timeout_s"]))
                except StepTimeout:
                    # The timer fired in the instant between the code's end and its disarming.
                    reply = {"type": "result", "exit_code": 1, "kill_reason": "timeout",
                             "wall_time_s": self.timeout_s, "cpu_time_s": 0.0}
            elif command == "ping":
                reply = {"type": "pong"}
            else:
                reply = {"type": "error", "message": f"unknown command {command!r}"}
            protocol.send(self.sock, reply)

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
        signal.signal(signal.SIGALRM, self._on_timer)
        signal.signal(signal.SIGPROF, self._on_timer)

    def run(self, code: str, timeout_s: float) -> dict[str, Any]:
        self._restore_streams()
        self.cell += 1
        filename = f"<cell-{self.cell}>"
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        exit_code, kill_reason = 0, None
        self.timeout_s = timeout_s
        cpu_start, wall_start = _cpu_seconds(), _perf_counter()
        try:
            self._in_step = True
            # A wall timer stops sleeps and loops; a CPU timer stops busy threads sooner.
            _setitimer(signal.ITIMER_REAL, timeout_s)
            _setitimer(signal.ITIMER_PROF, timeout_s)
            try:
                exec(compile(code, filename, "exec", dont_inherit=True), self.namespace)
            finally:
                # First thing: from here on a late timer signal is ignored.
                self._in_step = False
                _setitimer(signal.ITIMER_REAL, 0)
                _setitimer(signal.ITIMER_PROF, 0)
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
        return {
            "type": "result",
            "exit_code": exit_code,
            "kill_reason": kill_reason,
            "wall_time_s": wall,
            "cpu_time_s": max(0.0, _cpu_seconds() - cpu_start),
        }

    def _finish_step(self) -> None:
        """Undo what the step may have broken, and push its output into the pipes."""
        bd = builtins.__dict__
        bd.clear()
        bd.update(self._builtins)
        for stream in (sys.stdout, sys.stderr, self.stdout, self.stderr):
            try:
                stream.flush()
            except BaseException:  # noqa: BLE001 - agent code may have broken its own stream
                pass
        if "ctypes" in sys.modules:
            _flush_c_stdio()

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


def _flush_c_stdio() -> None:
    """Flush C-level stdio buffers (printf from ctypes or extensions) into the pipes."""
    try:
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> None:
    """Entry point: ``argv`` is [control socket fd, limits as JSON]."""
    import json

    sock = socket.socket(fileno=int(argv[0]))
    limits = json.loads(argv[1])
    isolation.become_subreaper()
    worker = Worker(sock)
    worker.warm_up()
    isolation.apply_rlimits(limits)
    worker.serve()
