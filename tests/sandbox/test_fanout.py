"""StepLoop: steps of several workers driven together, batch after batch."""

from __future__ import annotations

import os
import time

import pytest

from coding_gym.sandbox import fanout
from coding_gym.sandbox.fanout import StepLoop, Yielding, run_many
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


def test_the_loop_waits_as_a_batch_thread_and_its_thread_is_normal_again_after(backends):
    def body() -> tuple[list[int], int, int, int]:
        os.nice(3)
        seen: list[int] = []
        loop = watched(StepLoop(), seen)
        try:
            loop.run([b.begin("print(1)") for b in backends])
            drive = loop._drive

            def failing(runs):
                drive(runs)  # every reply read, then an error inside the loop
                raise ValueError("in the loop")

            loop._drive = failing  # type: ignore[method-assign]
            with pytest.raises(ValueError, match="in the loop"):
                loop.run([b.begin("print(2)") for b in backends])
            after_error = os.sched_getscheduler(0)
            run_many([b.begin("print(3)") for b in backends])
        finally:
            loop.close()
        return seen, after_error, os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)

    seen, after_error, after, nice = in_thread(body)
    assert seen == [os.SCHED_BATCH] * 2  # in both loops, the one that failed too
    assert after_error == after == os.SCHED_OTHER
    assert nice == os.getpriority(os.PRIO_PROCESS, 0) + 3  # its own nice, kept
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the other threads were not touched


def watched(loop: StepLoop, seen: list[int]) -> StepLoop:
    """``loop``, noting in ``seen`` its thread's policy each time it starts waiting."""
    drive = loop._drive

    def noting(runs):
        seen.append(os.sched_getscheduler(0))
        return drive(runs)

    loop._drive = noting  # type: ignore[method-assign]
    return loop


@pytest.mark.parametrize("policy", ["SCHED_BATCH", "SCHED_IDLE"])
def test_a_thread_under_another_policy_keeps_it(backends, policy):
    chosen = getattr(os, policy)

    def body() -> tuple[list[int], int]:
        os.sched_setscheduler(0, chosen, os.sched_param(0))
        seen: list[int] = []
        loop = watched(StepLoop(), seen)
        try:
            results = loop.run([b.begin("print(1)") for b in backends])
        finally:
            loop.close()
        assert [r.stdout for r in results] == ["1\n"] * 3
        return seen, os.sched_getscheduler(0)

    seen, after = in_thread(body)
    assert seen == [chosen] and after == chosen


def test_a_refused_policy_change_leaves_the_thread_as_it_is(backends, monkeypatch):
    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(fanout, "_set_policy", refuse)
    with Yielding() as yielding:
        assert not yielding.active and os.sched_getscheduler(0) == os.SCHED_OTHER
    results = run_many([b.begin("print(1)") for b in backends])
    assert [r.stdout for r in results] == ["1\n"] * 3
