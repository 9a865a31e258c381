"""The parent's side of one worker: spawn it, send code, drain its output, enforce the deadline.

Output arrives on two pipes that this side drains while the step runs, so a program printing
forever never blocks or fills memory: bytes past ``max_output_bytes`` are counted and dropped.
The reply arrives on a socket after the worker has flushed, so when it comes, the step's output
is already in the pipes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from coding_gym.errors import WorkerStartError
from coding_gym.models import ExecResult, KillReason, Limits
from coding_gym.sandbox import isolation, processes, protocol
from coding_gym.sandbox.cgroups import Cgroup

logger = logging.getLogger(__name__)

#: How long after ``timeout_s`` the parent waits for the in-worker timer before it kills the
#: worker. Together with the kill and reap it keeps every step within timeout + 1 s.
HARD_KILL_GRACE_S = 0.5
START_TIMEOUT_S = 30.0
_CHUNK = 1 << 16
_PIPE_BYTES = 1 << 20
_F_SETPIPE_SZ = 1031

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Loads the sandbox modules without running coding_gym/__init__.py (which imports Gymnasium):
# a stand-in package points at the real directory, then leaves sys.modules so agent code
# cannot import coding_gym.
_BOOTSTRAP = """\
import sys, types
def _boot():
    package = types.ModuleType("coding_gym")
    package.__path__ = [sys.argv[1]]
    sys.modules["coding_gym"] = package
    from coding_gym.sandbox import worker
    for name in [n for n in sys.modules if n.split(".")[0] == "coding_gym"]:
        del sys.modules[name]
    return worker.main
main = _boot()
del _boot, types
main(sys.argv[2:])
"""

_STDERR_NOTES = {
    "timeout": "[coding_gym] the step ran past its {timeout:g} s time limit and ignored the "
               "interrupt, so the interpreter was killed; variables from earlier steps are gone.\n",
    "memory": "[coding_gym] the interpreter ran out of memory and was killed; variables from "
              "earlier steps are gone.\n",
    "signal": "[coding_gym] the interpreter was killed by signal {signal}; variables from "
              "earlier steps are gone.\n",
    "crash": "[coding_gym] the interpreter exited with status {status}; variables from "
             "earlier steps are gone.\n",
}


class _Capture:
    """Bytes of one output stream for one step, kept up to a cap."""

    __slots__ = ("data", "cap", "truncated")

    def __init__(self, cap: int) -> None:
        self.data = bytearray()
        self.cap = cap
        self.truncated = False

    def note(self, text: str) -> None:
        """Append a message of our own on a line of its own, past the cap if need be."""
        if self.data and not self.data.endswith(b"\n"):
            self.data += b"\n"
        self.data += text.encode()

    def add(self, chunk: bytes) -> None:
        room = self.cap - len(self.data)
        if len(chunk) > room:
            self.truncated = True
            chunk = chunk[:max(room, 0)]
        self.data += chunk

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class WorkerProcess:
    """One live worker. Create it with :meth:`spawn`; it is gone after :meth:`kill`."""

    def __init__(self, proc: subprocess.Popen[bytes], sock: socket.socket, out_fd: int,
                 err_fd: int, cgroup: Cgroup | None) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.sock = sock
        self.out_fd = out_fd
        self.err_fd = err_fd
        self.cgroup = cgroup
        self._frames = protocol.FrameReader()
        self._poller = select.poll()
        for fd in (sock.fileno(), out_fd, err_fd):
            self._poller.register(fd, select.POLLIN)
        self.alive = True
        # Guards ``alive`` against interrupt() from another thread while kill() reaps: a reaped
        # pid may be reused, so it must never be signalled after the reap.
        self._kill_lock = threading.Lock()

    @classmethod
    def spawn(cls, limits: Limits, workdir: str) -> WorkerProcess:
        """Start a worker with ``sys.executable`` in ``workdir`` and wait until it is ready."""
        parent_sock, child_sock = socket.socketpair()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_w, err_w):
            try:
                import fcntl

                fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_BYTES)
            except OSError:
                pass  # bigger pipes only save wake-ups
        cgroup = Cgroup.create(limits.memory_mb * 1024 * 1024, limits.max_processes)
        limits_json = json.dumps({
            "memory_mb": limits.memory_mb,
            "max_file_mb": limits.max_file_mb,
            "max_open_files": limits.max_open_files,
            "max_processes": limits.max_processes,
        })
        try:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP, _PACKAGE_DIR,
                 str(child_sock.fileno()), limits_json],
                stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                pass_fds=(child_sock.fileno(),), cwd=workdir,
                env=isolation.worker_environment(workdir), start_new_session=True,
            )
        except OSError as e:
            for fd in (out_r, err_r):
                os.close(fd)
            if cgroup is not None:
                cgroup.remove()
            raise WorkerStartError(
                f"could not start the sandbox worker {sys.executable}: {e}"
            ) from e
        finally:
            child_sock.close()
            os.close(out_w)
            os.close(err_w)
        if cgroup is not None:
            try:
                cgroup.add(proc.pid)
            except OSError as e:
                logger.warning("could not move the worker into its cgroup: %s", e)
        for fd in (out_r, err_r):
            os.set_blocking(fd, False)
        parent_sock.setblocking(False)
        worker = cls(proc, parent_sock, out_r, err_r, cgroup)
        worker._await_ready()
        return worker

    def _await_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        err = _Capture(1 << 16)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise WorkerStartError(
                    f"the sandbox worker did not start within {START_TIMEOUT_S:g} s"
                )
            for fd, _ in self._poller.poll(remaining * 1000):
                if fd == self.err_fd:
                    _drain(fd, err)
                elif fd == self.out_fd:
                    _drain(fd, _Capture(0))
                else:
                    message = self._read_reply()
                    if message is not None and message.get("type") == "ready":
                        return
                    self.kill()
                    _drain(self.err_fd, err)
                    raise WorkerStartError(
                        "the sandbox worker exited during start-up "
                        f"(status {self.proc.returncode}): {err.text().strip()[-2000:]}"
                    )

    def _read_reply(self) -> dict[str, Any] | None:
        """The next whole message, or None when the worker is gone or spoke garbage."""
        while True:
            try:
                chunk = self.sock.recv(_CHUNK)
            except BlockingIOError:
                return {"type": "pending"}
            except OSError:
                return None
            if not chunk:
                return None
            try:
                messages = self._frames.feed(chunk)
            except protocol.ProtocolError as e:
                logger.warning("worker %d sent an invalid message: %s", self.pid, e)
                return None
            if messages:
                return messages[0]

    def run(self, code: str, limits: Limits) -> ExecResult:
        """Run ``code`` to completion, timeout or death; the worker may be dead afterwards."""
        out, err = _Capture(limits.max_output_bytes), _Capture(limits.max_output_bytes)
        started = time.perf_counter()
        deadline = time.monotonic() + limits.timeout_s + HARD_KILL_GRACE_S
        try:
            # Blocking while sending: code bigger than the socket buffer (~400 kB) must wait
            # for the worker to read it; a non-blocking sendall fails half-way.
            self.sock.settimeout(limits.timeout_s + HARD_KILL_GRACE_S)
            self.sock.sendall(protocol.encode(
                {"cmd": "run", "code": code, "timeout_s": limits.timeout_s}
            ))
            self.sock.setblocking(False)
        except OSError:
            return self._died(out, err, started, limits)
        sock_fd = self.sock.fileno()
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._timed_out(out, err, started, limits)
            for fd, _ in self._poller.poll(remaining * 1000):
                if fd == self.out_fd:
                    _drain(fd, out)
                elif fd == self.err_fd:
                    _drain(fd, err)
                elif fd == sock_fd:
                    reply = self._read_reply()
                    if reply is None or reply.get("type") not in ("pending", "result"):
                        return self._died(out, err, started, limits)
                    if reply["type"] == "result":
                        _drain(self.out_fd, out)
                        _drain(self.err_fd, err)
                        return _result(reply, out, err, started)

    def _timed_out(self, out: _Capture, err: _Capture, started: float,
                   limits: Limits) -> ExecResult:
        self.kill()
        _drain(self.out_fd, out)
        _drain(self.err_fd, err)
        err.note(_STDERR_NOTES["timeout"].format(timeout=limits.timeout_s))
        return ExecResult(
            stdout=out.text(), stderr=err.text(), exit_code=128 + signal.SIGKILL,
            wall_time_s=time.perf_counter() - started, stdout_truncated=out.truncated,
            stderr_truncated=err.truncated, kill_reason="timeout", state_lost=True,
        )

    def _died(self, out: _Capture, err: _Capture, started: float, limits: Limits) -> ExecResult:
        """The worker exited (or broke the protocol) in the middle of a step."""
        status: int | None
        try:
            status = self.proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            status = None  # alive but incoherent: treat as a crash
        oom = self.cgroup is not None and self.cgroup.oom_killed()
        self.kill()
        _drain(self.out_fd, out)
        _drain(self.err_fd, err)
        reason: KillReason
        if oom:
            reason, exit_code = "memory", 128 + signal.SIGKILL
            note = _STDERR_NOTES["memory"]
        elif status is not None and status < 0:
            reason, exit_code = "signal", 128 - status
            note = _STDERR_NOTES["signal"].format(signal=_signal_name(-status))
        else:
            reason, exit_code = "crash", 1 if status is None else status % 256
            note = _STDERR_NOTES["crash"].format(status="unknown" if status is None else status)
        err.note(note)
        return ExecResult(
            stdout=out.text(), stderr=err.text(), exit_code=exit_code,
            wall_time_s=time.perf_counter() - started, stdout_truncated=out.truncated,
            stderr_truncated=err.truncated, kill_reason=reason, state_lost=True,
        )

    def interrupt(self) -> None:
        """SIGKILL the worker and everything it started, from any thread.

        A :meth:`run` in progress in another thread sees the death at once and returns its
        result (``state_lost``); that thread still owns the clean-up (:meth:`kill`).
        """
        with self._kill_lock:
            if not self.alive or self.proc.returncode is not None:
                return
            if self.cgroup is not None:
                self.cgroup.kill()
            processes.kill_tree(self.pid, pgid=self.pid)

    def kill(self) -> None:
        """Kill the worker and everything it started; safe to call twice."""
        with self._kill_lock:
            if not self.alive:
                return
            self.alive = False
            if self.cgroup is not None:
                self.cgroup.kill()
            processes.kill_tree(self.pid, pgid=self.pid)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            logger.error("worker %d did not exit after SIGKILL", self.pid)
        if self.cgroup is not None:
            self.cgroup.remove()
        self.sock.close()

    def close(self) -> None:
        """Kill the worker and release the parent's ends of its pipes."""
        self.kill()
        for fd in (self.out_fd, self.err_fd):
            try:
                os.close(fd)
            except OSError:
                pass
        self.out_fd = self.err_fd = -1


def _drain(fd: int, capture: _Capture) -> None:
    """Read everything available now from a non-blocking pipe."""
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except BlockingIOError:
            return
        except OSError as e:
            if e.errno == errno.EINTR:
                continue
            return
        if not chunk:
            return
        capture.add(chunk)


def _result(reply: dict[str, Any], out: _Capture, err: _Capture, started: float) -> ExecResult:
    exit_code = reply.get("exit_code")
    kill_reason = reply.get("kill_reason")
    return ExecResult(
        stdout=out.text(),
        stderr=err.text(),
        exit_code=exit_code if isinstance(exit_code, int) and 0 <= exit_code < 256 else 1,
        wall_time_s=_seconds(reply.get("wall_time_s"), time.perf_counter() - started),
        cpu_time_s=_seconds(reply.get("cpu_time_s"), 0.0),
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        kill_reason=kill_reason if kill_reason in ("timeout", "memory") else None,
    )


def _seconds(value: Any, default: float) -> float:
    """A duration reported by the worker, which agent code could have forged."""
    return float(value) if isinstance(value, (int, float)) and value >= 0 else default


def _signal_name(signum: int) -> str:
    try:
        return f"{signal.Signals(signum).name} ({signum})"
    except ValueError:
        return str(signum)
