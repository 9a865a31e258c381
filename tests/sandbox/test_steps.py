"""Steps, and what the worker keeps from step to step."""

from __future__ import annotations

import time


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
