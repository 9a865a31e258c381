"""Plain data passed between the env, the backends and the server."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

KillReason = Literal["timeout", "memory", "signal", "crash"]
KILL_REASONS: tuple[str, ...] = ("timeout", "memory", "signal", "crash")


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
        return self if timeout_s is None else replace(self, timeout_s=float(timeout_s))


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
        data.update(self.extra)
        return data
