"""Process-tree helpers: what they refuse to do."""

from __future__ import annotations

import pytest

from coding_gym.sandbox import processes


@pytest.mark.parametrize("pid", [0, 1, -5])
def test_kill_tree_refuses_init_and_bogus_pids(pid):
    # Every process descends from init: killing "the tree of pid 1" would end the machine.
    with pytest.raises(ValueError, match=f"pid {pid}"):
        processes.kill_tree(pid)
