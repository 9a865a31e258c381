"""The sandbox worker: runs an episode's code, one request at a time, top to bottom.

Started by :class:`coding_gym.sandbox.supervisor.WorkerProcess`, either as a fresh
``sys.executable`` (:func:`main`) or forked from the zygote (:func:`start`). Its fds 1 and 2 are
pipes the parent drains (see ``streams.py``); fd 0 is /dev/null; requests and replies travel
over a socket (see ``protocol.py``), which also carries file descriptors for the commands that
hand the interpreter to a new process. Variables live in one namespace for the whole episode.

Snapshots and forks of the interpreter are copies of this process (see ``copies.py``).

Only the standard library is imported here, and the names the worker relies on are bound at
import time, so code that monkeypatches ``os``, ``json`` or ``builtins`` cannot break the loop.
If it still manages to, the parent sees a dead or incoherent worker and replaces it.
"""

from __future__ import annotations

import _signal
import builtins
import collections
import json
import linecache
import os
import resource
import signal
import socket
import sys
import time
import traceback
import types
from collections.abc import Mapping
from typing import Any

from coding_gym.sandbox import isolation
from coding_gym.sandbox.copies import Copies
from coding_gym.sandbox.protocol import Channel, encode_run
from coding_gym.sandbox.streams import StepStreams, flush_c_stdio
from coding_gym.sandbox.walls import Walls

#: Code objects of recent programs, kept so that a program sent again is not compiled again.
_COMPILED_CACHE = 64
_perf_counter = time.perf_counter
_process_time = time.process_time
_getrusage = resource.getrusage
_RUSAGE_CHILDREN = resource.RUSAGE_CHILDREN
# The C functions themselves: signal.signal's enum conversions cost ~10 µs a call.
_setitimer = _signal.setitimer
_set_handler = _signal.signal
_get_handler = _signal.getsignal
_ITIMER_REAL = signal.ITIMER_REAL
_ITIMER_PROF = signal.ITIMER_PROF
_SIGALRM = int(signal.SIGALRM)
_SIGPROF = int(signal.SIGPROF)
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


class Worker(Copies):
    """The command loop and the namespace of one episode."""

    def __init__(self, sock: socket.socket, isolation_report: Mapping[str, Any] | None = None
                 ) -> None:
        self.channel = Channel(sock)
        self.isolation_report = dict(isolation_report or {})
        self.joined_cgroup = False
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
        self._on_timer_handler = self._on_timer  # one bound method: see _keep_timer_handlers
        self._builtins = dict(builtins.__dict__)
        self._compiled: collections.OrderedDict[str, types.CodeType] = collections.OrderedDict()
        self.streams = StepStreams()

    def serve(self) -> None:
        """Answer requests until the parent closes the socket."""
        self._keep_timer_handlers()
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
                    wake = self.snapshot(reusable=False)
                    if wake is None:
                        continue  # in the copy, woken in place of this step's worker
                    if wake >= 0:
                        self.channel.send({"type": "snapshot"}, [wake])
                        os.close(wake)
                    else:
                        self.channel.send({"type": "snapshot", "error": self.copy_error})
                reply = self._run_request(request)
            elif command == "snapshot":
                wake = self.snapshot(reusable=True)
                if wake is None:
                    continue
                if wake >= 0:
                    reply, reply_fds = {"type": "snapshot"}, [wake]
                else:
                    reply = {"type": "error", "message": self.copy_error}
            elif command == "fork":
                if len(fds) == 3 and self.fork_into(fds):
                    continue  # in the copy, now the worker of another env
                reply = ({"type": "forked"} if len(fds) == 3 and not self.copy_error else
                         {"type": "error", "message": self.copy_error or "expected 3 fds"})
            elif command == "ping":
                reply = {"type": "pong"}
            else:
                reply = {"type": "error", "message": f"unknown command {command!r}"}
            for fd in fds:
                os.close(fd)
            self.channel.send(reply, reply_fds)
            for fd in reply_fds:
                os.close(fd)
            self.settle()

    def _send_ready(self) -> None:
        self.channel.send({"type": "ready", "pid": os.getpid(),
                           "isolation": self.isolation_report,
                           "joined_cgroup": self.joined_cgroup})

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

    def _keep_timer_handlers(self) -> None:
        """Install the timers' handler where it is missing (only there: a system call each):
        once before the first step, then after every step, whose code may have replaced it.
        It must be back before the step's timers, which stay armed between steps, fire: the
        default action of either signal ends the interpreter."""
        handler = self._on_timer_handler
        if _get_handler(_SIGALRM) is not handler:
            _set_handler(_SIGALRM, handler)
        if _get_handler(_SIGPROF) is not handler:
            _set_handler(_SIGPROF, handler)

    def run(self, code: str, timeout_s: float) -> dict[str, Any]:
        streams = self.streams
        streams.restore()
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
                # From here on a timer signal is ignored; the timers stay armed (the next
                # step sets them again): between steps they fire at most once, for nothing,
                # and disarming them cost two system calls every step.
                self._in_step = False
                self._keep_timer_handlers()
        except SystemExit as e:
            exit_code, message = _exit_status(e.code)
            streams.write_stderr(message)
        except BaseException as e:
            exit_code = 1
            if isinstance(e, StepTimeout):
                kill_reason = "timeout"
            elif isinstance(e, MemoryError):
                kill_reason = "memory"
            streams.write_stderr(self._format_traceback(e))
        wall = _perf_counter() - wall_start
        out_pending, err_pending = self._finish_step()
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
            "out": out_pending,
            "err": err_pending,
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

    def _finish_step(self) -> tuple[int, int]:
        """Undo what the step may have broken, and push its output into the pipes; the bytes
        waiting in the stdout and stderr pipes (see :meth:`StepStreams.finish`)."""
        bd = builtins.__dict__
        bd.clear()
        bd.update(self._builtins)
        return self.streams.finish()

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
    # Look the C function up now: in a zygote, once for all its children (a first look-up
    # builds a ctypes class, ~0.4 ms of a forked child's first step, most of it page faults).
    flush_c_stdio()


def rehearse() -> None:
    """Run one step through a throwaway worker, request to reply, then drop it.

    For a zygote's spare, while it waits: the copy-on-write faults of a worker's start-up and
    of its first step (its first request read, code compiled and run, reply encoded and sent)
    are taken ahead. Without it a new worker's first step was ~0.4 ms slower than the next.
    """
    ours, theirs = socket.socketpair()
    saved = sys.stdout, sys.stderr, sys.stdin, sys.modules.get("__main__"), sys.argv
    handlers = _get_handler(_SIGALRM), _get_handler(_SIGPROF)
    rehearsal = Worker(theirs)
    try:
        ours.sendall(encode_run("pass", 60.0))
        request, _ = rehearsal.channel.recv()
        if request is not None:
            rehearsal.channel.send(rehearsal._run_request(request))
            ours.recv(1 << 16)
    finally:
        _setitimer(_ITIMER_REAL, 0)
        _setitimer(_ITIMER_PROF, 0)
        for signum, handler in zip((_SIGALRM, _SIGPROF), handlers, strict=True):
            if handler is not None:  # None: installed by C code, which Python cannot put back
                _set_handler(signum, handler)
        sys.stdout, sys.stderr, sys.stdin, main, sys.argv = saved
        if main is not None:
            sys.modules["__main__"] = main
        for code in rehearsal._compiled.values():
            linecache.cache.pop(code.co_filename, None)
        rehearsal.streams.close()
        rehearsal.channel.close()
        ours.close()


def start(sock: socket.socket, config: Mapping[str, Any], *, warm: bool = False,
          walls: Walls | None = None, joined_cgroup: bool = False) -> None:
    """Isolate this process, then serve: the common path after spawn and after fork.

    ``config`` comes from :func:`coding_gym.sandbox.isolation.worker_config`; ``warm``: this
    process ran :func:`warm_up` itself already (a zygote's spare child, ahead of the request;
    a warm-up inherited from the zygote would leave the first step the copy-on-write faults);
    ``walls``: the namespaces it built ahead, the same way; ``joined_cgroup``: it moved
    itself into its cgroup (the ready message tells the parent, which moves it otherwise).
    """
    worker = Worker(sock)
    worker.joined_cgroup = joined_cgroup
    if not warm:
        warm_up()
    try:
        worker.isolation_report = dict(isolation.apply(config, walls))
    except Exception as e:  # noqa: BLE001 - tell the parent why, then stop
        worker.channel.send({"type": "error", "message": f"{type(e).__name__}: {e}"})
        return
    worker.serve()


def main(argv: list[str]) -> None:
    """Entry point of a spawned worker: ``argv`` is [control socket fd, config as JSON]."""
    start(socket.socket(fileno=int(argv[0])), json.loads(argv[1]))
