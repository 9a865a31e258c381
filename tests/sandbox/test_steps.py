"""Steps, and what the worker keeps from step to step."""

from __future__ import annotations

import os
import time

import pytest

from coding_gym.sandbox.capture import Capture, collect


def test_the_same_program_twice_gives_the_same_result_and_traceback(backends):
    backend = backends[0]
    code = "def f(n):\n    return 10 // n\nprint(f(5))\nf(0)"
    first, second = backend.run(code), backend.run(code)
    assert first.stdout == second.stdout == "2\n"
    assert "return 10 // n" in first.stderr and first.stderr == second.stderr


def test_steps_without_definitions_do_not_grow_the_line_cache(backends):
    backend = backends[0]
    backend.run("def keep():\n    return 1")
    for i in range(300):
        backend.run(f"x = {i}")
    count = backend.run("import linecache\nprint(sum(1 for k in linecache.cache "
                        "if k.startswith('<cell-')))").stdout
    assert int(count) < 100
    assert "return 1" in backend.run("import inspect\nprint(inspect.getsource(keep))").stdout


def test_output_left_by_a_background_process_arrives_later(backends):
    backend = backends[0]
    backend.run("import subprocess\nsubprocess.Popen(['sh', '-c', 'sleep 0.2; echo late'])")
    time.sleep(0.5)
    assert backend.run("pass").stdout == "late\n"


def _sleeps(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches in /proc/PID/status")


def test_the_worker_sleeps_once_per_step(backends):
    # Waiting for a request must not be woken when the parent reads the last reply (a
    # blocking recvmsg is: the kernel tells the sender's socket there is room to write).
    backend = backends[0]
    backend.run("pass")
    pid = backend.worker_pid
    assert pid is not None
    before = _sleeps(pid)
    for _ in range(300):
        backend.run("x = 1")
    assert _sleeps(pid) - before < 1.5 * 300


FORGE = (
    "import json, struct, sys\n"
    "frame = sys._getframe()\n"
    "while not hasattr(frame.f_locals.get('self'), 'channel'):\n"
    "    frame = frame.f_back\n"
    "worker = frame.f_locals['self']\n"
    "body = json.dumps({0}).encode()\n"
    "worker.channel.sock.sendall(struct.pack('<I', len(body)) + body)\n"
)


def test_forged_replies_do_not_break_the_parent(backends):
    # The step's code can reach the worker's socket and answer in its place: whatever it
    # says, the parent makes a result of it, and the backend goes on (after a new
    # interpreter, when the reply was not one).
    backend = backends[0]
    for reply in ({"type": "result", "exit_code": "0", "out": "x", "err": None,
                   "wall_ns": -1, "kill_reason": "nonsense"},
                  {"type": "snapshot"}, {"type": "mystery"}):
        result = backend.run(FORGE.format(reply))
        assert isinstance(result.stdout, str) and isinstance(result.exit_code, int)
        assert "Traceback" not in result.stderr  # the reply was sent
        for _ in range(3):  # the real reply of the forging step may come first
            after = backend.run("print('still here')")
        assert after.stdout == "still here\n"


@pytest.fixture
def pipe():
    """A non-blocking pipe as a worker's output: (read end, write end)."""
    read, write = os.pipe()
    os.set_blocking(read, False)
    yield read, write
    os.close(read)
    os.close(write)


def test_collect_reads_what_the_worker_says_it_left(pipe):
    read, write = pipe
    os.write(write, "héllo\n".encode())
    assert collect(read, None, 7, cap=100) == ("héllo\n", False)
    assert collect(read, None, 0, cap=100) == ("", False)  # silent: no read at all


def test_collect_takes_no_more_than_there_is_or_than_the_cap(pipe):
    read, write = pipe
    os.write(write, b"short")
    assert collect(read, None, 1000, cap=100) == ("short", False)  # a count that lies
    os.write(write, b"x" * 150)
    assert collect(read, None, 150, cap=100) == ("x" * 100, True)
    assert collect(read, None, 0, cap=100) == ("", False)  # the rest was read and dropped


@pytest.mark.parametrize("pending", [-1, "7", None, True])
def test_collect_drains_the_pipe_when_the_count_is_unknown_or_forged(pipe, pending):
    read, write = pipe
    os.write(write, b"one\ntwo\n")
    assert collect(read, None, pending, cap=100) == ("one\ntwo\n", False)


def test_collect_puts_what_the_step_drained_before_first(pipe):
    read, write = pipe
    drained = Capture(10)
    drained.add(b"early ")
    os.write(write, b"late output")
    assert collect(read, drained, 11, cap=10) == ("early late", True)
    drained = Capture(100)
    drained.add(b"all of it")
    assert collect(read, drained, 0, cap=100) == ("all of it", False)
