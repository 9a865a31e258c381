"""A thousand resets must leave every count where it started.

Counted: processes below this one, open fds (a uid lease is a socket, so a leaked lease
shows there), resident memory of this process and of its descendants, and this process's
cgroups; and every episode's directory must be gone. Some episodes end their worker the hard
way (exit, crash, timeout kill, a daemon left running) so that every clean-up path runs.
"""

from __future__ import annotations

import gc
import glob
import os
import time
from dataclasses import dataclass

import pytest

from coding_gym.env import CodingEnv
from coding_gym.sandbox import cgroups
from coding_gym.sandbox.processes import rss_kb
from tests.helpers import descendant_pids

RESETS = 1000

#: Every 25th episode runs one of these; the others a plain step.
ROUGH_ENDINGS = [
    "import os\nos._exit(1)",
    "import ctypes\nctypes.string_at(0)",
    "import subprocess\nsubprocess.Popen(['sleep', '1000'], start_new_session=True)",
    "sum(range(10 ** 12))",
    "import threading, time\nthreading.Thread(target=time.sleep, args=(100,)).start()",
]


@dataclass
class Counts:
    processes: int
    fds: int
    rss_kb: int
    cgroups: int


def _cgroup_dirs() -> int:
    support = cgroups.probe()
    if not support.version:
        return 0
    return len(glob.glob(os.path.join(support.memory_dir, f"coding-gym-{os.getpid()}-*")))


def count(foreign: set[int]) -> Counts:
    """Counts of this process and its descendants, but for ``foreign`` ones (other tests')."""
    pids = descendant_pids() - foreign
    return Counts(
        processes=len(pids),
        fds=len(os.listdir("/proc/self/fd")),
        rss_kb=rss_kb(os.getpid()) + sum(rss_kb(pid) for pid in pids),
        cgroups=_cgroup_dirs(),
    )


def settled(env: CodingEnv, foreign: set[int], timeout_s: float = 15.0) -> Counts:
    """Counts once only the live worker is left: the exits of the ones before it, and of
    what they started, are asynchronous."""
    live = {env.unwrapped.backend.worker_pid}
    deadline = time.monotonic() + timeout_s
    while descendant_pids() - live - foreign and time.monotonic() < deadline:
        time.sleep(0.05)
    gc.collect()  # other tests' objects left to the collector close their fds now, not between
    return count(foreign)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_thousand_resets_leave_nothing_behind():
    # Workers of other tests' envs that are still alive (module fixtures) come and go on
    # their own: not this test's to count.
    foreign = descendant_pids()
    with CodingEnv(timeout_s=1.0, memory_mb=256) as env:
        for _ in range(20):  # warm up: the zygote, imports, allocator pools
            env.reset()
            env.step("x = 1")
        before = settled(env, foreign)
        workdirs = set()
        for episode in range(RESETS):
            env.reset()
            workdirs.add(env.unwrapped.backend.workdir)
            code = ROUGH_ENDINGS[episode // 25 % len(ROUGH_ENDINGS)] if episode % 25 == 0 \
                else "x = sum(range(100))"
            env.step(code)
        env.reset()
        after = settled(env, foreign)
    assert after.processes == before.processes, (before, after)
    assert after.fds == before.fds, (before, after)
    assert after.cgroups == before.cgroups, (before, after)
    assert len(workdirs) == RESETS
    assert not [path for path in workdirs if os.path.exists(path)]
    assert after.rss_kb < before.rss_kb * 1.05 + 4096, (before, after)
