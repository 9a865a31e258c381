"""StepLoop: steps of several workers driven together, batch after batch."""

from __future__ import annotations

import os
import time

import pytest

from coding_gym.sandbox.fanout import StepLoop, run_many
from tests.helpers import in_thread


def test_run_many_drives_every_step_to_its_own_end(backends):
    codes = [
        "import time\ntime.sleep(0.3)\nprint('slow')",
        "sum(range(10**12))",  # ignores the interrupt: killed at its deadline
        "import sys\nprint('x' * 3_000_000)\nprint('fast', file=sys.stderr)",
    ]
    start = time.monotonic()
    results = run_many([b.begin(code) for b, code in zip(backends, codes, strict=True)])
    assert time.monotonic() - start < 1.0 + 1.0
    slow, killed, loud = results
    assert slow.stdout == "slow\n" and slow.exit_code == 0
    assert killed.kill_reason == "timeout" and killed.state_lost
    assert loud.stdout_truncated and loud.stderr == "fast\n"
    assert backends[1].run("print('fresh')").stdout == "fresh\n"


def test_a_loop_follows_its_workers_when_they_are_replaced(backends):
    loop = StepLoop()
    try:
        for i in range(3):
            results = loop.run([b.begin(f"print({i} + {k})") for k, b in enumerate(backends)])
            assert [r.stdout for r in results] == [f"{i + k}\n" for k in range(3)]
        backends[0].reset()  # a new worker, whose fds may reuse the old one's numbers
        died = loop.run([backends[0].begin("import os; os._exit(3)"),
                         *(b.begin("print('ok')") for b in backends[1:])])
        assert died[0].kill_reason == "crash" and [r.stdout for r in died[1:]] == ["ok\n"] * 2
        again = loop.run([b.begin("print('again')") for b in backends])
        assert [r.stdout for r in again] == ["again\n"] * 3
    finally:
        loop.close()


def test_a_worker_that_writes_after_its_reply_does_not_stall_the_others(backends):
    loop = StepLoop()
    try:
        chatty = ("import threading, time, os\n"
                  "def talk():\n"
                  "    for _ in range(50):\n"
                  "        os.write(1, b'.')\n"
                  "        time.sleep(0.01)\n"
                  "threading.Thread(target=talk, daemon=True).start()")
        loop.run([backends[0].begin(chatty),
                  *(b.begin("import time; time.sleep(0.05)") for b in backends[1:])])
        start = time.monotonic()
        results = loop.run([b.begin("import time; time.sleep(0.1); print(1)")
                            for b in backends])
        assert time.monotonic() - start < 0.5
        assert [r.stdout.strip(".") for r in results] == ["1\n"] * 3
    finally:
        loop.close()


@pytest.mark.parametrize("policy", ["SCHED_OTHER", "SCHED_BATCH"])
def test_the_loop_leaves_its_threads_policy_and_nice_alone(backends, policy):
    # It once waited as a batch thread: beside busy processes, a woken batch thread waits
    # for the scheduler's tick (see fanout.py).
    chosen = getattr(os, policy)

    def body() -> tuple[list[tuple[int, int]], int, int]:
        os.sched_setscheduler(0, chosen, os.sched_param(0))
        os.nice(3)
        seen: list[tuple[int, int]] = []
        loop = StepLoop()
        drive = loop._drive

        def noting(runs):
            seen.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)))
            return drive(runs)

        loop._drive = noting  # type: ignore[method-assign]
        try:
            results = loop.run([b.begin("print(1)") for b in backends])
        finally:
            loop.close()
        assert [r.stdout for r in results] == ["1\n"] * 3
        return seen, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)

    nice = os.getpriority(os.PRIO_PROCESS, 0) + 3
    seen, after, after_nice = in_thread(body)
    assert seen == [(chosen, nice)] and (after, after_nice) == (chosen, nice)
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the other threads were not touched
