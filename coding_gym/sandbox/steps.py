"""Steps in flight: send code to workers, drain their output, enforce deadlines, build results.

A :class:`StepRun` is driven alone by :meth:`StepRun.wait`, or with the steps of other workers
by :mod:`coding_gym.sandbox.fanout`.

Output arrives on two pipes per worker that this side drains while the step runs, so a program
printing forever never blocks or fills memory: bytes past ``max_output_bytes`` are counted and
dropped. The reply arrives on the control socket after the worker has flushed, so when it comes
the step's output is already in the pipes. For the first :data:`QUIET_S` of a step only the
reply and the worker's death can wake the parent: a short step's output is then read once,
after the reply, instead of waking the parent a second time just before it. A program that
fills a pipe sooner waits at most that long.
"""

from __future__ import annotations

import os
import signal
import time
from typing import TYPE_CHECKING, Any

from coding_gym.models import ExecResult, KillReason, Limits
from coding_gym.sandbox.capture import Capture, collect, drain, with_note
from coding_gym.sandbox.protocol import ResultFields, encode_run, kill_reason_of

if TYPE_CHECKING:
    from coding_gym.sandbox.cgroups import Cgroup
    from coding_gym.sandbox.frozen import FrozenCopy
    from coding_gym.sandbox.supervisor import WorkerProcess

#: How long after ``timeout_s`` the parent waits for the in-worker timer before it kills the
#: worker. Together with the kill and reap it keeps every step within timeout + 1 s.
HARD_KILL_GRACE_S = 0.5
#: How long a step runs before its output pipes are watched as well as its reply. At least
#: a scheduler tick (4 ms at 250 Hz): the wait's timer then expires after the tick's, and
#: the kernel need not program the timer device for it, at the start of the wait and again
#: when the reply cuts it short. In a VM that is a write to a model-specific register, which
#: exits to the hypervisor: with 2 ms, a step of a single env (whose CPU does not go idle,
#: see affinity.py) cost 8-12 µs more CPU, and took 110-117 µs against 84-88 µs.
QUIET_S = 0.004
_monotonic = time.monotonic
_perf_counter = time.perf_counter

_CAUSES = {
    "timeout": "the step ran past its {timeout:g} s time limit and ignored the interrupt, so "
               "the interpreter was killed",
    "memory": "the interpreter ran out of memory and was killed",
    "signal": "the interpreter was killed by signal {signal}",
    "crash": "the interpreter exited with status {status}",
    "unstarted": "the step's {timeout:g} s time limit ran out before it could start (it "
                 "waited {spent:.2f} s, for a fresh interpreter)",
}
LOST = "variables from earlier steps are gone"
ROLLED_BACK = "it was restored to its state before this step"


def note(kind: str, consequence: str, **details: Any) -> str:
    """The line the sandbox adds to stderr when it stopped the interpreter."""
    return f"[coding_gym] {_CAUSES[kind].format(**details)}; {consequence}.\n"


def unstarted(timeout_s: float, spent_s: float) -> ExecResult:
    """The result of a step whose time limit ran out before its code could be sent."""
    return ExecResult(stderr=note("unstarted", "its code did not run", timeout=timeout_s,
                                  spent=spent_s),
                      exit_code=1, wall_time_s=0.0, kill_reason="timeout")


class StepRun:
    """One step in flight on one worker. Create it, then pass it to :func:`run_many`.

    With ``snapshot``, the worker leaves a frozen copy of itself before running the code
    (a transactional step): if the step then has to be killed, the copy is first moved out of
    the way (into ``parking``), and the caller can wake it in place of the dead worker.

    ``spent_s``: how much of the time limit went by before the step could start (waiting for
    a fresh interpreter): the code gets the rest. With nothing left, the code is not sent,
    and the step ends at once, stopped by its time limit.
    """

    __slots__ = ("worker", "limits", "out", "err", "started", "deadline", "quiet_until",
                 "result", "wake_fd", "frozen", "parking", "snapshot", "_snapshot_error",
                 "spent_s")

    def __init__(self, worker: WorkerProcess, code: str, limits: Limits, *,
                 snapshot: bool = False, parking: Cgroup | None = None,
                 spent_s: float = 0.0) -> None:
        self.worker = worker
        self.limits = limits
        #: What was drained from the pipes during the step; made when there is some.
        self.out: Capture | None = None
        self.err: Capture | None = None
        self.result: ExecResult | None = None
        self.wake_fd = -1
        self.frozen: FrozenCopy | None = None
        self.parking = parking
        self.snapshot = snapshot
        self._snapshot_error = ""
        self.spent_s = spent_s
        self.started = _perf_counter()
        now = _monotonic()
        budget = limits.timeout_s if not spent_s else round(limits.timeout_s - spent_s, 3)
        self.deadline = now + budget + HARD_KILL_GRACE_S
        self.quiet_until = now + QUIET_S
        if budget <= 0:
            self.result = unstarted(limits.timeout_s, spent_s)
            return
        request = encode_run(code, budget, snapshot)
        if not worker.send(request, budget + HARD_KILL_GRACE_S):
            self._die()

    def _captures(self) -> tuple[Capture, Capture]:
        """The step's captures of stdout and stderr, made if need be."""
        cap = self.limits.max_output_bytes
        if self.out is None:
            self.out = Capture(cap)
        if self.err is None:
            self.err = Capture(cap)
        return self.out, self.err

    def on_event(self, fd: int) -> None:
        """Handle readiness of one of the worker's fds (socket, exit, pipes); may finish the
        step."""
        worker = self.worker
        if fd == worker.sock_fd:
            if not self.snapshot:
                fields = worker.inbox.receive_result()
                if fields is not None:
                    self.on_result(fields)
                    return
            self._on_messages()
        elif fd == worker.out_fd:
            drain(fd, self._captures()[0])
        elif fd == worker.err_fd:
            drain(fd, self._captures()[1])
        else:  # the worker's exit
            self._die()

    def _on_messages(self) -> None:
        """Messages other than a plain result: a transactional step's, or garbage."""
        worker = self.worker
        for message, fds in worker.inbox.receive(with_fds=self.snapshot):
            kind = message.get("type")
            if kind == "result" and not fds:
                self._finish(message)
                return
            if kind == "snapshot" and len(fds) == 1 and self.wake_fd < 0:
                self.wake_fd = fds[0]
                continue
            for extra in fds:
                os.close(extra)
            if kind == "snapshot":
                self._snapshot_error = str(message.get("error", "no copy was made"))
            elif kind == "result":
                self._finish(message)
                return
            else:
                self._die()
                return
        if not worker.inbox.connected:
            self._die()

    def on_result(self, fields: ResultFields) -> None:
        """Finish the step with the fields of a plain reply (``Inbox.receive_result``): read
        what it left in the pipes, and make the result."""
        exit_code, reason, wall_ns, cpu_ns, out_pending, err_pending = fields
        self._conclude(exit_code, kill_reason_of(reason), wall_ns, cpu_ns, out_pending,
                       err_pending)

    def _finish(self, reply: dict[str, Any]) -> None:
        """The worker replied: read what the step left in the pipes, and make the result."""
        self._conclude(reply.get("exit_code"), reply.get("kill_reason"), reply.get("wall_ns"),
                       reply.get("cpu_ns"), reply.get("out"), reply.get("err"))

    def _conclude(self, exit_code: Any, kill_reason: Any, wall_ns: Any, cpu_ns: Any,
                  out_pending: Any, err_pending: Any) -> None:
        """:meth:`_finish` from the reply's fields, as the worker sent them."""
        worker, cap = self.worker, self.limits.max_output_bytes
        # Counts from the worker (0 for a silent stream: no read at all); collect checks them.
        stdout, out_truncated = collect(worker.out_fd, self.out, out_pending, cap)
        stderr, err_truncated = collect(worker.err_fd, self.err, err_pending, cap)
        if kill_reason == "timeout" and self.spent_s:
            stderr = with_note(stderr, self._spent_note())
        # Durations are integer nanoseconds from the worker, which agent code could forge.
        # Fields by position, in ExecResult's order: keywords cost a dict per step.
        self.result = ExecResult(
            stdout,
            stderr,
            exit_code if type(exit_code) is int and 0 <= exit_code < 256 else 1,
            (wall_ns / 1e9 if type(wall_ns) is int and wall_ns >= 0
             else _perf_counter() - self.started),
            cpu_ns / 1e9 if type(cpu_ns) is int and cpu_ns >= 0 else 0.0,
            out_truncated,
            err_truncated,
            kill_reason if kill_reason in ("timeout", "memory") else None,
        )

    def wait(self) -> ExecResult:
        """Drive this step alone to its result (:func:`run_many` does it for many)."""
        quiet, full = self.worker.pollers()
        while self.result is None:
            now = _monotonic()
            if now >= self.deadline:
                self.expire()
                break
            if now < self.quiet_until:
                events = quiet.poll((min(self.quiet_until, self.deadline) - now) * 1000)
            else:
                self.worker.release()  # code that runs this long may use every CPU
                events = full.poll((self.deadline - now) * 1000)
            for fd, _ in events:
                self.on_event(fd)
                if self.result is not None:
                    break
        assert self.result is not None
        return self.result

    def _spent_note(self) -> str:
        """What a step stopped by its time limit says of the time it waited to start."""
        return (f"[coding_gym] {self.spent_s:.2f} s of the step's {self.limits.timeout_s:g} s "
                "time limit went by before its code started, waiting for a fresh "
                "interpreter.\n")

    def expire(self) -> None:
        """The deadline passed: kill the worker (its copy survives) and report the timeout."""
        self._keep_copy()
        worker = self.worker
        worker.kill()
        out, err = self._captures()
        drain(worker.out_fd, out)
        drain(worker.err_fd, err)
        consequence = ROLLED_BACK if self.frozen is not None else LOST
        err.note(note("timeout", consequence, timeout=self.limits.timeout_s))
        if self.spent_s:
            err.note(self._spent_note())
        self.result = ExecResult(
            stdout=out.text(), stderr=err.text(), exit_code=128 + signal.SIGKILL,
            wall_time_s=_perf_counter() - self.started, stdout_truncated=out.truncated,
            stderr_truncated=err.truncated, kill_reason="timeout",
            state_lost=self.frozen is None,
        )

    def _die(self) -> None:
        """The worker exited, or broke the protocol, in the middle of the step."""
        self._keep_copy()
        worker = self.worker
        returncode = worker.exit_returncode(timeout_s=0.2)
        oom = worker.oom_killed()
        worker.kill()
        out, err = self._captures()
        drain(worker.out_fd, out)
        drain(worker.err_fd, err)
        consequence = ROLLED_BACK if self.frozen is not None else LOST
        reason: KillReason
        if oom:
            reason, exit_code = "memory", 128 + signal.SIGKILL
            text = note("memory", consequence)
        elif returncode is not None and returncode < 0:
            reason, exit_code = "signal", 128 - returncode
            text = note("signal", consequence, signal=_signal_name(-returncode))
        else:
            reason = "crash"
            exit_code = 1 if returncode is None else returncode % 256
            text = note("crash", consequence,
                        status="unknown" if returncode is None else returncode)
        err.note(text)
        self.result = ExecResult(
            stdout=out.text(), stderr=err.text(), exit_code=exit_code,
            wall_time_s=_perf_counter() - self.started, stdout_truncated=out.truncated,
            stderr_truncated=err.truncated, kill_reason=reason,
            state_lost=self.frozen is None,
        )

    def _keep_copy(self) -> None:
        """Before the worker's cgroup is killed, move this step's frozen copy out of it."""
        if self.wake_fd >= 0 and self.frozen is None:
            from coding_gym.sandbox.frozen import FrozenCopy

            copy = FrozenCopy(self.wake_fd)
            self.wake_fd = -1
            if copy.park(self.parking):
                self.frozen = copy
            else:
                copy.release()

    def take_copy(self) -> FrozenCopy | None:
        """The frozen copy of the worker as it was before the step (parked), if one was made."""
        self._keep_copy()
        return self.frozen

    def discard_copy(self) -> None:
        """Let go of the step's copy: it exits when it sees its socket close."""
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1
        if self.frozen is not None:
            self.frozen.release()
            self.frozen = None

    @property
    def snapshot_error(self) -> str:
        return self._snapshot_error


def _signal_name(signum: int) -> str:
    try:
        return f"{signal.Signals(signum).name} ({signum})"
    except ValueError:
        return str(signum)

