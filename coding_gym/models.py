"""Plain data passed between the env, the backends and the server."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

KillReason = Literal["timeout", "memory", "signal", "crash"]
KILL_REASONS: tuple[str, ...] = ("timeout", "memory", "signal", "crash")
#: Resolution of the timings in a step's ``info``. A seeded step must repeat its info exactly
#: (Gymnasium's determinism check compares it), and on a shared machine a sub-millisecond
#: step can take a millisecond more: at 10 ms, scheduling noise no longer shows. The exact
#: figures are in ``ExecResult`` for whoever measures with the backend directly.
TIMING_RESOLUTION_S = 0.01


@dataclass(frozen=True)
class Limits:
    """Resource limits applied to every step of an episode.

    Attributes:
        timeout_s: Wall-clock limit of one step. Python code is interrupted inside the worker
            (variables survive); code that ignores signals is killed from outside after a grace
            period, and the interpreter is replaced.
        memory_mb: Address-space limit of the worker (and a memory cgroup where available).
        max_output_bytes: Bytes of stdout and of stderr kept per step; the rest is discarded
            and the ``*_truncated`` flag is set.
        max_file_mb: Largest file the code may write.
        max_open_files: Open file descriptors of the worker.
        max_processes: Processes (and threads) the episode may hold at once, enforced by a
            pids cgroup where available.
    """

    timeout_s: float = 10.0
    memory_mb: int = 1024
    max_output_bytes: int = 1 << 20
    max_file_mb: int = 64
    max_open_files: int = 256
    max_processes: int = 64

    def __post_init__(self) -> None:
        for name in ("timeout_s", "memory_mb", "max_output_bytes", "max_file_mb",
                     "max_open_files", "max_processes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive number, got {value!r}")

    def with_timeout(self, timeout_s: float | None) -> Limits:
        """The same limits with another step timeout (``None`` keeps this one)."""
        # The server asks for each step's timeout, mostly the one these limits have already.
        if timeout_s is None or timeout_s == self.timeout_s:
            return self
        return replace(self, timeout_s=float(timeout_s))


@dataclass(frozen=True)
class Isolation:
    """Which isolation layers wrap the sandbox worker; each one can be turned off.

    A layer the machine does not allow (no root, no libseccomp, inside a default Docker
    container) is skipped and the worker's report says why; with ``strict=True`` the worker
    refuses to start instead. See SECURITY.md for what each layer guarantees.

    Attributes:
        network: A network namespace of its own: only a loopback interface, no route out.
        filesystem: A mount and IPC namespace: everything read-only except the episode's
            directory and a private /tmp and /dev/shm; home directories hidden.
        user: An unprivileged uid of its own per episode (needs root to set up).
        seccomp: A system call filter: no sockets but AF_UNIX, no ptrace, mount, namespaces,
            BPF, keyrings, module loading, reboot and the like.
        cgroup: A memory and pids cgroup per worker (the process cap that binds root).
        rlimits: Resource limits for memory, file size, open files and core dumps.
        strict: Refuse to start a worker when a layer that is on cannot be applied.
    """

    network: bool = True
    filesystem: bool = True
    user: bool = True
    seccomp: bool = True
    cgroup: bool = True
    rlimits: bool = True
    strict: bool = False

    @classmethod
    def none(cls) -> Isolation:
        """Every layer off: the worker runs with the caller's privileges (trusted code only)."""
        return cls(network=False, filesystem=False, user=False, seccomp=False, cgroup=False,
                   rlimits=False)

    @classmethod
    def coerce(cls, value: Isolation | Mapping[str, bool] | None) -> Isolation:
        """An :class:`Isolation` from itself, a mapping of its fields, or None (the default)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(
                    f"Unknown isolation option(s) {unknown}; expected some of {sorted(known)}"
                )
            for name, flag in value.items():
                if not isinstance(flag, bool):
                    raise ValueError(
                        f"isolation[{name!r}] must be True or False, got {flag!r}"
                    )
            return cls(**value)
        raise TypeError(
            f"Expected isolation to be an Isolation, a dict of its fields or None, "
            f"got {type(value).__name__} ({value!r})"
        )

    def layers(self) -> dict[str, bool]:
        """Layer name -> on, without ``strict``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "strict"}


@dataclass
class ExecResult:
    """What running one piece of code produced.

    ``exit_code`` follows the shell convention: 0 success, 1 uncaught exception, ``n`` for
    ``SystemExit(n)``, ``128 + N`` when the worker died of signal N.
    """

    stdout: str = ""
    stderr: str = ""
    exit_code: int = 0
    wall_time_s: float = 0.0
    cpu_time_s: float = 0.0
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    kill_reason: KillReason | None = None
    state_lost: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def info(self) -> dict[str, Any]:
        """The fields that travel in a step's ``info`` dict (everything but the output)."""
        data: dict[str, Any] = {
            "wall_time_s": self.wall_time_s,
            "cpu_time_s": self.cpu_time_s,
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "kill_reason": self.kill_reason,
            "state_lost": self.state_lost,
        }
        if self.extra:
            data.update(self.extra)
        return data


def coarse(seconds: float) -> float:
    """``seconds`` rounded down to :data:`TIMING_RESOLUTION_S`, as a step's ``info`` has it."""
    ticks = math.floor(seconds * (1 / TIMING_RESOLUTION_S) + 1e-9)
    return ticks * TIMING_RESOLUTION_S
