"""How ``coding-gym serve`` sets up its process."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Counts the heaps glibc made for threads (64 MiB-aligned reservations) once six threads have
# each allocated while all are alive.
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
heaps = 0
with open("/proc/self/maps") as f:
    for line in f:
        fields = line.split()
        start = int(fields[0].split("-")[0], 16)
        if len(fields) == 5 and fields[1] == "rw-p" and start % (64 << 20) == 0:
            heaps += 1
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
