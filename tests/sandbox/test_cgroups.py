"""The per-episode cgroup: what the parent sets, and that agent code cannot leave it."""

from __future__ import annotations

import os

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits
from coding_gym.sandbox import cgroups

support = cgroups.probe()
pytestmark = pytest.mark.skipif(not support.version,
                                reason=f"no cgroups here: {support.reason}")

_TREE = ("import os, subprocess, time\n"
         "child = subprocess.Popen(['sleep', '30'], start_new_session=True)\n"
         "time.sleep(0.2)\n"
         "print(os.getpid(), child.pid)")


def _members(controller_dir: str, group: str) -> set[int]:
    with open(os.path.join(controller_dir, group, "cgroup.procs")) as f:
        return {int(line) for line in f if line.strip()}


def _group_of(pid: int, controller: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, names, path = line.rstrip("\n").split(":", 2)
            if controller in names.split(",") or (not names and support.version == 2):
                return os.path.basename(path)
    raise AssertionError(f"process {pid} is in no {controller} cgroup")


def test_the_episode_and_what_it_starts_share_limited_cgroups(no_leaked_processes):
    with LocalBackend(Limits(memory_mb=300, max_processes=40)) as backend:
        backend.reset()
        worker, child = map(int, backend.run(_TREE).stdout.split())
        group = _group_of(worker, "pids")
        assert group.startswith(f"coding-gym-{os.getpid()}-")
        assert {worker, child} <= _members(support.pids_dir, group)
        assert {worker, child} <= _members(support.memory_dir, group)
        with open(os.path.join(support.pids_dir, group, "pids.max")) as f:
            assert f.read().strip() == "40"
        limit = "memory.limit_in_bytes" if support.version == 1 else "memory.max"
        with open(os.path.join(support.memory_dir, group, limit)) as f:
            assert int(f.read()) == 300 << 20
