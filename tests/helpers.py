"""Helpers shared by tests."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from coding_gym.backends.local import LocalBackend
    from coding_gym.models import ExecResult

T = TypeVar("T")


def in_thread(body: Callable[[], T], cpu: int | None = None) -> T:
    """``body()`` in a thread of its own (scheduling policies and CPU masks are per thread),
    allowed only ``cpu`` if given; its return value, or its exception raised here."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            if cpu is not None:
                os.sched_setaffinity(0, (cpu,))
            outcome["value"] = body()
        except BaseException as e:  # noqa: BLE001 - raised in the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def loop_step(backend: LocalBackend, code: str) -> ExecResult:
    """A step begun as the vector env and the server begin theirs (``begin``, then
    ``finish``): its worker never follows the calling thread (see sandbox/affinity.py)."""
    step = backend.begin(code)
    return backend.finish(step, step.wait())


def settle(backend: object) -> None:
    """Wait for the start of ``backend``'s next interpreter (``start_ahead``), if one is under
    way: a count of processes taken before then would miss it."""
    following = getattr(backend, "_next", None)
    if following is not None:
        following._wait()


def descendant_pids(root: int | None = None) -> set[int]:
    """Pids below ``root`` (default: this process) in the process tree.

    The zygote and its spare child are left out: they live as long as the test process, and
    the spare is replaced each time it becomes a worker.
    """
    from coding_gym.sandbox.processes import descendants
    from coding_gym.sandbox.spare import NAME as SPARE_NAME
    from coding_gym.sandbox.zygote_loop import ZYGOTE_NAME

    return {pid for pid in descendants(os.getpid() if root is None else root)
            if process_name(pid) not in (ZYGOTE_NAME, SPARE_NAME)}


def process_name(pid: int) -> str:
    """/proc/PID/comm, or "" once the process is gone."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
