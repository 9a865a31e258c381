"""How ``coding-gym serve`` sets up its process."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Counts the heaps glibc made for threads once six threads have each allocated while all are
# alive.
_COUNT_THREAD_ARENAS = """
import sys, threading
from coding_gym.server import serving
if sys.argv[1] == "tuned":
    assert serving.tune_allocator()
barrier = threading.Barrier(7)
kept = []
def work():
    kept.append([bytearray(4096) for _ in range(100)])  # malloc, not pymalloc
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
barrier.wait()
maps = []
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        maps.append((start, end, fields[1], len(fields)))
# A thread's heap: a 64 MiB reservation at a 64 MiB boundary, its used part read-write and
# the rest inaccessible. Each thread here uses far less than 64 MiB, so the inaccessible rest
# is always there; that tells a heap from other anonymous memory that happens to be aligned
# and 64 MiB long (numpy's BLAS maps such buffers). A thread's stack, by chance aligned, has
# its guard below it.
heaps = 0
for (start, end, perms, n), after in zip(maps, maps[1:] + [(0, 0, "", 0)]):
    if (perms == "rw-p" and n == 5 and start % (64 << 20) == 0
            and after[0] == end and after[2] == "---p"):
        heaps += after[1] - start == 64 << 20
barrier.wait()
for t in threads:
    t.join()
print(heaps)
"""


def _thread_heaps(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _COUNT_THREAD_ARENAS, mode], check=True,
                         capture_output=True, text=True, timeout=60)
    return int(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_tuned_allocator_keeps_threads_on_one_heap():
    assert _thread_heaps("default") >= 1, "threads should get heaps of their own by default"
    assert _thread_heaps("tuned") == 0



# Reports (as JSON) what wait_as_batch did to the calling thread, and whether a second call
# (on a thread no longer normal) changed anything.
_WAIT_AS_BATCH = """
import json, os
from coding_gym.server import serving
os.nice(2)
report = {"changed": serving.wait_as_batch(), "policy": os.sched_getscheduler(0),
          "nice": os.getpriority(os.PRIO_PROCESS, 0), "again": serving.wait_as_batch()}
print(json.dumps(report))
"""


def test_the_event_loop_thread_waits_as_a_batch_thread_with_its_nice_value():
    import json
    import os

    done = subprocess.run([sys.executable, "-c", _WAIT_AS_BATCH], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["changed"] is True and report["policy"] == os.SCHED_BATCH
    assert report["nice"] == os.getpriority(os.PRIO_PROCESS, 0) + 2  # kept
    assert report["again"] is False  # a thread not under SCHED_OTHER is left alone


def test_a_refused_policy_change_leaves_the_event_loop_thread_as_it_is(monkeypatch):
    import os

    from coding_gym.server import serving

    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    assert serving.wait_as_batch() is False
    assert os.sched_getscheduler(0) == os.SCHED_OTHER
