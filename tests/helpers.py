"""Helpers shared by tests."""

from __future__ import annotations

import os


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
