"""Helpers shared by tests."""

from __future__ import annotations

import os


def descendant_pids(root: int | None = None) -> set[int]:
    """Pids below ``root`` (default: this process) in the process tree."""
    from coding_gym.sandbox.processes import descendants

    return set(descendants(os.getpid() if root is None else root))
