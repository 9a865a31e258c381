"""Process-tree helpers: what they refuse to do."""

from __future__ import annotations

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.sandbox import processes


@pytest.mark.parametrize("pid", [0, 1, -5])
def test_kill_tree_refuses_init_and_bogus_pids(pid):
    # Every process descends from init: killing "the tree of pid 1" would end the machine.
    with pytest.raises(ValueError, match=f"pid {pid}"):
        processes.kill_tree(pid)


def test_restore_session_weight_undoes_what_the_worker_lowered():
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            grouped = f.read().strip() == "1"
    except OSError:
        grouped = False  # a kernel without session grouping: nothing to undo, nothing fails
    with LocalBackend() as backend:
        backend.reset()
        pid = backend.worker_pid
        assert pid is not None

        def nice() -> str:
            with open(f"/proc/{pid}/autogroup") as f:
                return f.read().split()[-1]

        if grouped:
            assert nice() == "19"
        processes.restore_session_weight(pid)
        if grouped:
            assert nice() == "0"
        assert backend.run("print(1)").stdout == "1\n"
