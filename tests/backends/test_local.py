"""LocalBackend: persistence, exit codes, both timeout paths, capture, limits, cleanup."""

from __future__ import annotations

import glob
import os
import signal
import tempfile
import time

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.errors import BackendError
from coding_gym.models import Limits
from coding_gym.sandbox import isolation
from tests.helpers import descendant_pids, settle
from tests.servers import wait_for


def test_variables_functions_and_imports_persist(backend):
    backend.run("import math\nx = 3\ndef area(r):\n    return math.pi * r * r")
    result = backend.run("print(x, round(area(x), 2))")
    assert result.stdout == "3 28.27\n"
    assert result.exit_code == 0


def test_reset_gives_fresh_interpreter_and_directory(backend):
    backend.run("x = 1\nopen('mine.txt', 'w').write('hi')")
    old_dir = backend.workdir
    backend.reset()
    result = backend.run("import os\nprint(os.listdir('.'))\nprint(x)")
    assert result.stdout == "[]\n"
    assert "NameError: name 'x' is not defined" in result.stderr
    # Removed while the next interpreter starts ahead, in the background.
    wait_for(lambda: not os.path.exists(old_dir))


def test_reset_removes_the_old_directory_even_when_no_worker_can_start(backend, monkeypatch):
    old_dir = backend.workdir

    def no_config(*args, **kwargs):
        raise OSError("no config today")

    monkeypatch.setattr(isolation, "worker_config", no_config)
    with pytest.raises(OSError, match="no config today"):
        backend.reset()
    assert not os.path.exists(old_dir)
    monkeypatch.undo()
    backend.reset()
    assert backend.run("print(1)").stdout == "1\n"


@pytest.mark.parametrize("start_method", ["zygote", "spawn"])
def test_close_removes_every_directory_the_backend_made(start_method):
    pattern = os.path.join(tempfile.gettempdir(), "coding-gym-*")
    before = set(glob.glob(pattern))
    backend = LocalBackend(Limits(timeout_s=2.0), start_method=start_method)
    for _ in range(3):
        backend.reset()
        backend.run("open('kept.txt', 'w').write('x')")
    settle(backend)
    # The episode's, the next episode's (its interpreter started ahead), and the directory
    # made ahead for the one after.
    assert backend.workdir in set(glob.glob(pattern)) - before
    assert len(set(glob.glob(pattern)) - before) == 3
    backend.close()
    assert set(glob.glob(pattern)) - before == set()


def test_uncaught_exception_shows_only_agent_frames(backend):
    result = backend.run("def f():\n    raise ValueError('boom')\nf()")
    assert result.exit_code == 1
    assert result.kill_reason is None
    assert "ValueError: boom" in result.stderr
    assert 'line 2, in f' in result.stderr
    assert "worker.py" not in result.stderr and "coding_gym" not in result.stderr


def test_syntax_error(backend):
    result = backend.run("def (:")
    assert result.exit_code == 1
    assert "SyntaxError" in result.stderr
    assert "worker.py" not in result.stderr


@pytest.mark.parametrize(
    ("code", "exit_code", "stderr"),
    [("raise SystemExit(3)", 3, ""), ("import sys; sys.exit()", 0, ""),
     ("import sys; sys.exit(256 + 7)", 7, ""), ("import sys; sys.exit('bye')", 1, "bye\n")],
)
def test_system_exit_keeps_the_worker(backend, code, exit_code, stderr):
    backend.run("kept = 'yes'")
    pid = backend.worker_pid
    result = backend.run(code)
    assert (result.exit_code, result.stderr, result.state_lost) == (exit_code, stderr, False)
    assert backend.run("print(kept)").stdout == "yes\n"
    assert backend.worker_pid == pid


def test_death_by_signal_maps_to_128_plus_n(backend):
    backend.run("x = 1")
    result = backend.run("import ctypes; ctypes.string_at(0)")
    assert result.exit_code == 128 + signal.SIGSEGV
    assert result.kill_reason == "signal"
    assert result.state_lost
    assert "SIGSEGV" in result.stderr
    after = backend.run("print('alive')")
    assert after.stdout == "alive\n" and not after.state_lost


def test_os_exit_is_a_crash_and_next_step_works(backend):
    result = backend.run("import os; os._exit(4)")
    assert (result.exit_code, result.kill_reason, result.state_lost) == (4, "crash", True)
    assert backend.run("print(1)").stdout == "1\n"


def test_soft_timeout_stops_python_loop_and_keeps_state(backend):
    backend.run("x = 41")
    start = time.monotonic()
    result = backend.run("while True:\n    x += 0", timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + 1.0
    assert result.kill_reason == "timeout"
    assert result.exit_code == 1
    assert "StepTimeout" in result.stderr
    assert not result.state_lost
    assert backend.run("print(x + 1)").stdout == "42\n"


def test_soft_timeout_stops_sleep(backend):
    start = time.monotonic()
    result = backend.run("import time; time.sleep(60)", timeout_s=0.5)
    assert time.monotonic() - start < 1.5
    assert result.kill_reason == "timeout" and not result.state_lost


def test_soft_timeout_is_not_swallowed_by_except_exception(backend):
    code = "while True:\n    try:\n        pass\n    except Exception:\n        pass"
    result = backend.run(code, timeout_s=0.5)
    assert result.kill_reason == "timeout"


def test_hard_timeout_kills_c_loop_and_loses_state(backend):
    backend.run("x = 1")
    start = time.monotonic()
    result = backend.run("sum(range(10**12))", timeout_s=1.0)
    assert time.monotonic() - start < 1.0 + 1.0
    assert result.kill_reason == "timeout"
    assert result.state_lost
    assert result.exit_code == 128 + signal.SIGKILL
    assert "time limit" in result.stderr
    after = backend.run("print(x)")
    assert "NameError" in after.stderr


def test_hard_timeout_when_agent_ignores_the_timer(backend):
    code = "import signal, time\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n" \
           "signal.signal(signal.SIGPROF, signal.SIG_IGN)\ntime.sleep(30)"
    start = time.monotonic()
    result = backend.run(code, timeout_s=0.5)
    assert time.monotonic() - start < 1.5
    assert result.kill_reason == "timeout" and result.state_lost


def test_the_time_limit_counts_from_when_the_step_was_asked_for(backend):
    # A server passes the moment a step arrived: time spent waiting for a fresh interpreter
    # is part of the step's limit, so that its reply still comes within it.
    backend.run("x = 1")
    result = backend.run("import time\ntime.sleep(30)", timeout_s=1.5,
                         asked_at=time.monotonic() - 1.0)
    assert result.kill_reason == "timeout" and not result.state_lost
    assert result.wall_time_s < 1.5  # the 0.5 s left, not the whole limit
    assert "1.00 s of the step's 1.5 s time limit went by before its code started" \
        in result.stderr
    assert backend.run("print(x)").stdout == "1\n"


def test_a_step_whose_time_limit_ran_out_before_it_started_does_not_run(backend):
    backend.run("x = 1")
    result = backend.run("open('ran', 'w').write('yes')\nx = 2", timeout_s=1.0,
                         asked_at=time.monotonic() - 1.2)
    assert result.kill_reason == "timeout" and result.exit_code == 1
    assert not result.state_lost
    assert "time limit ran out before it could start" in result.stderr
    assert backend.run("import os\nprint(x, os.path.exists('ran'))").stdout == "1 False\n"


def test_timer_signals_reset_by_a_step_do_not_end_the_idle_interpreter(backend):
    # The step's timers stay armed after it; their handler must be back before they fire.
    code = "import signal\nfor s in (signal.SIGALRM, signal.SIGPROF):\n" \
           "    signal.signal(s, signal.SIG_DFL)\nx = 5"
    assert backend.run(code, timeout_s=0.3).exit_code == 0
    time.sleep(0.6)  # past the step's limit, idle
    after = backend.run("print(x)", timeout_s=0.3)
    assert after.stdout == "5\n" and not after.state_lost
    looping = backend.run("while True: pass", timeout_s=0.3)
    assert looping.kill_reason == "timeout" and not looping.state_lost


def test_memory_hog_is_stopped(backend):
    result = backend.run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))")
    assert result.kill_reason == "memory"
    assert result.exit_code != 0
    assert backend.run("print('still here')").stdout == "still here\n"


def test_fork_bomb_is_contained(no_leaked_processes):
    with LocalBackend(Limits(timeout_s=2.0, max_processes=32)) as backend:
        backend.reset()
        start = time.monotonic()
        result = backend.run("import os\nwhile True:\n    try:\n        os.fork()\n"
                             "    except OSError:\n        pass")
        assert time.monotonic() - start < 3.0
        assert result.kill_reason is not None
        pid = backend.worker_pid
        assert pid is None or len(descendant_pids(pid)) <= 32
        assert backend.run("print('ok')").stdout == "ok\n"


def test_worker_killed_from_outside(backend):
    backend.run("x = 1")
    os.kill(backend.worker_pid, signal.SIGKILL)
    time.sleep(0.1)
    result = backend.run("print('hello')")
    assert result.state_lost or result.stdout == "hello\n"
    assert backend.run("print('again')").stdout == "again\n"


def test_worker_killed_mid_step(backend):
    pid = backend.worker_pid
    import threading

    threading.Timer(0.3, os.kill, (pid, signal.SIGKILL)).start()
    result = backend.run("import time; time.sleep(1.5)")
    assert result.exit_code == 128 + signal.SIGKILL
    assert result.kill_reason == "signal" and result.state_lost
    assert backend.run("print(2)").stdout == "2\n"


def test_parent_environment_is_not_visible(monkeypatch):
    monkeypatch.setenv("CODING_GYM_TEST_SECRET", "hunter2")
    with LocalBackend() as backend:
        backend.reset()
        result = backend.run("import os\nprint(os.environ.get('CODING_GYM_TEST_SECRET'))\n"
                             "print(os.environ['OMP_NUM_THREADS'])")
        assert result.stdout == "None\n1\n"


def test_no_process_left_after_close(no_leaked_processes):
    backend = LocalBackend()
    backend.reset()
    backend.run(
        "import subprocess, os\n"
        "subprocess.Popen(['sleep', '300'])\n"
        "subprocess.Popen(['setsid', 'sleep', '300'])\n"
        "if os.fork() == 0:\n    os.setsid()\n    import time\n    time.sleep(300)\n"
    )
    assert len(descendant_pids(backend.worker_pid)) >= 2
    backend.close()
    backend.close()  # safe twice


def test_no_process_left_after_hard_timeout(no_leaked_processes):
    with LocalBackend(Limits(timeout_s=0.5)) as backend:
        backend.reset()
        backend.run("import subprocess\np = subprocess.Popen(['sleep', '300'])\n"
                    "sum(range(10**12))")


def test_closed_backend_raises_clear_error():
    backend = LocalBackend()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.run("print(1)")


def test_patched_builtins_do_not_break_the_worker(backend):
    backend.run("import builtins\nbuiltins.len = None\nbuiltins.isinstance = None")
    assert backend.run("print(len('abc'))").stdout == "3\n"


def test_code_bigger_than_the_socket_buffer_runs(backend):
    code = "x = 1\n" + "#" * 2_000_000 + "\nprint(x + 1)"
    result = backend.run(code)
    assert (result.exit_code, result.stdout, result.state_lost) == (0, "2\n", False)


def test_interrupt_from_another_thread_kills_the_running_step(no_leaked_processes, backend):
    import threading

    backend.run("x = 1")
    pid = backend.worker_pid
    threading.Timer(0.3, backend.interrupt).start()
    result = backend.run("import subprocess\nsubprocess.Popen(['sleep', '300'])\n"
                         "import time\ntime.sleep(30)")
    assert result.kill_reason == "signal" and result.state_lost
    assert result.exit_code == 128 + signal.SIGKILL
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert "NameError" in backend.run("print(x)").stderr


def test_interrupt_before_reset_is_a_no_op_and_when_idle_is_reported():
    with LocalBackend() as backend:
        backend.interrupt()
        backend.reset()
        backend.run("x = 5")
        backend.interrupt()
        reported = backend.run("print('lost')")
        assert reported.kill_reason == "signal" and reported.state_lost
        assert backend.run("print('fresh')").stdout == "fresh\n"
