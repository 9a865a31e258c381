"""Hostile programs, each with what a correct sandbox must answer.

A program is run as one step with a short time limit (:data:`TIMEOUT_S`). Its ``check``
receives the step's :class:`Outcome` and asserts the specific answer: a clear exit code,
kill reason and message. What every program must also satisfy (returning within the limit
plus one second, the env working afterwards, other sessions unaffected, nothing leaked) is
checked by the test that runs them.

``{port}`` and ``{udp_port}`` in a program are loopback ports the test listens on, to prove
that nothing arrives there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TIMEOUT_S = 2.0
#: The secret the test process holds in its environment; no program may print it.
SECRET_NAME = "CODING_GYM_HOSTILE_SECRET"
SECRET_VALUE = "hostile-suite-secret-5f1c9e"


@dataclass
class Outcome:
    """One step: the observation, the info dict and the wall time seen by the caller."""

    stdout: str
    stderr: str
    exit_code: int
    info: dict[str, Any]
    elapsed_s: float


@dataclass
class Program:
    name: str
    code: str
    check: Callable[[Outcome], None]
    #: Isolation layers any one of which keeps the program from harming the machine; the
    #: program is skipped where none of them is active.
    needs: tuple[str, ...] = ()
    #: Whether the program's stdout must hold a pid that may not outlive the episode.
    prints_pid: bool = False


def ok(outcome: Outcome) -> None:
    assert outcome.exit_code == 0, outcome
    assert outcome.info["kill_reason"] is None, outcome


def soft_timeout(outcome: Outcome) -> None:
    """Stopped by the in-worker timer: the interpreter and its variables survive."""
    assert outcome.info["kill_reason"] == "timeout", outcome
    assert outcome.exit_code == 1 and "StepTimeout" in outcome.stderr, outcome
    assert not outcome.info["state_lost"], outcome


def timeout(outcome: Outcome) -> None:
    """Stopped by the timer or, if it ignored it, killed from outside."""
    assert outcome.info["kill_reason"] == "timeout", outcome
    if outcome.info["state_lost"]:
        assert outcome.exit_code == 137 and "time limit" in outcome.stderr, outcome
    else:
        assert outcome.exit_code == 1 and "StepTimeout" in outcome.stderr, outcome


def hard_timeout(outcome: Outcome) -> None:
    """Code that ignores signals: killed from outside, the interpreter replaced."""
    assert outcome.info["kill_reason"] == "timeout", outcome
    assert outcome.exit_code == 137 and outcome.info["state_lost"], outcome
    assert "ignored the interrupt" in outcome.stderr, outcome


def raised(name: str, text: str = "") -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        assert outcome.exit_code == 1, outcome
        assert name in outcome.stderr and text in outcome.stderr, outcome
        assert not outcome.info["state_lost"], outcome
    return check


def died_of(signal_number: int) -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        assert outcome.exit_code == 128 + signal_number, outcome
        assert outcome.info["kill_reason"] == "signal", outcome
        assert outcome.info["state_lost"] and "killed by signal" in outcome.stderr, outcome
    return check


def memory(outcome: Outcome) -> None:
    assert outcome.info["kill_reason"] == "memory", outcome
    assert "MemoryError" in outcome.stderr or "out of memory" in outcome.stderr, outcome


def stdout_truncated(outcome: Outcome) -> None:
    assert outcome.info["stdout_truncated"], outcome.info
    assert len(outcome.stdout.encode()) <= (1 << 20) + 4096


def printed(expected: str) -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        ok(outcome)
        assert outcome.stdout == expected, outcome
    return check


def all_refused(outcome: Outcome) -> None:
    """The program printed one line per attempt; every attempt must have been refused."""
    ok(outcome)
    lines = outcome.stdout.splitlines()
    assert lines and all(line.endswith("refused") for line in lines), outcome.stdout


def no_secret(outcome: Outcome) -> None:
    ok(outcome)
    assert SECRET_VALUE not in outcome.stdout + outcome.stderr, outcome
    assert SECRET_NAME not in outcome.stdout, outcome


def crashed(status: int) -> Callable[[Outcome], None]:
    def check(outcome: Outcome) -> None:
        assert outcome.exit_code == status and outcome.info["kill_reason"] == "crash", outcome
        assert outcome.info["state_lost"], outcome
    return check


def decoded_safely(outcome: Outcome) -> None:
    ok(outcome)
    assert "\ufffd" in outcome.stdout, outcome
    outcome.stdout.encode("utf-8")  # no lone surrogates: the text is valid UTF-8


def stopped(outcome: Outcome) -> None:
    """Died or was killed: whichever, said clearly, with the interpreter replaced."""
    assert outcome.info["state_lost"] and outcome.info["kill_reason"], outcome
    assert "[coding_gym]" in outcome.stderr, outcome


def attempt(label: str, body: str) -> str:
    """Lines of a program that print "<label> refused" when ``body`` raises OSError."""
    indented = "\n".join("    " + line for line in body.splitlines())
    return (f"try:\n{indented}\n    print({label!r}, 'allowed')\n"
            f"except OSError:\n    print({label!r}, 'refused')\n")


PROGRAMS: list[Program] = [
    # Time.
    Program("python_infinite_loop", "while True:\n    pass\n", soft_timeout),
    Program("c_infinite_loop", "sum(range(10 ** 13))\n", hard_timeout),
    Program("catastrophic_regex", "import re\nre.match(r'(a+)+$', 'a' * 64 + 'b')\n",
            timeout),
    Program("sleep_forever", "import time\ntime.sleep(10 ** 6)\n", soft_timeout),
    Program("timer_disarmed_then_loop",
            "import signal\nsignal.setitimer(signal.ITIMER_REAL, 0)\n"
            "signal.setitimer(signal.ITIMER_PROF, 0)\n"
            "for s in (signal.SIGALRM, signal.SIGPROF, signal.SIGTERM):\n"
            "    signal.signal(s, signal.SIG_IGN)\nwhile True:\n    pass\n", hard_timeout),
    Program("stop_itself", "import os, signal\nos.kill(os.getpid(), signal.SIGSTOP)\n",
            hard_timeout),
    Program("swallow_every_exception",
            "while True:\n    try:\n        while True:\n            pass\n"
            "    except BaseException:\n        pass\n", hard_timeout),
    # Processes.
    Program("fork_bomb",
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n"
            "        pass\n", timeout, needs=("cgroup", "user")),
    Program("threads_left_running",
            "import threading, time\n"
            "def spin():\n    while True:\n        time.sleep(0.001)\n"
            "for _ in range(8):\n    threading.Thread(target=spin, daemon=True).start()\n"
            "threading.Thread(target=time.sleep, args=(10 ** 6,)).start()\nprint('started')\n",
            printed("started\n")),
    Program("daemon_child_left_running",
            "import os, subprocess\n"
            "child = subprocess.Popen(['sleep', '1000'], start_new_session=True)\n"
            "print(child.pid)\n", ok, prints_pid=True),
    Program("double_forked_daemon",
            "import os, time\nread, write = os.pipe()\nif os.fork() == 0:\n    os.setsid()\n"
            "    if os.fork() == 0:\n        os.write(write, str(os.getpid()).encode())\n"
            "        time.sleep(1000)\n    os._exit(0)\n"
            "os.close(write)\nprint(os.read(read, 32).decode())\n", ok, prints_pid=True),
    Program("kill_own_process_group", "import os, signal\nos.killpg(0, signal.SIGKILL)\n",
            died_of(9)),
    # Memory and crashes.
    Program("memory_bomb",
            "blocks = []\nwhile True:\n    blocks.append(bytearray(64 * 1024 * 1024))\n",
            memory),
    Program("os_exit", "import os\nos._exit(3)\n", crashed(3)),
    Program("segfault_via_ctypes", "import ctypes\nctypes.string_at(0)\n", died_of(11)),
    Program("abort", "import os\nos.abort()\n", died_of(6)),
    Program("deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)\n",
            raised("RecursionError")),
    Program("c_stack_overflow",
            "import sys\nsys.setrecursionlimit(10 ** 8)\n"
            "def f(n):\n    return f(n + 1)\nf(0)\n", stopped),
    Program("hostile_exception_str",
            "class Evil(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\n"
            "raise Evil()\n", raised("Evil")),
    # Output.
    Program("print_100_mb", "print('x' * 100_000_000)\n", stdout_truncated),
    Program("print_without_newline_forever",
            "import sys\nwhile True:\n    sys.stdout.write('x' * 4096)\n",
            lambda o: (timeout(o), stdout_truncated(o))),
    Program("huge_single_line", "import os\nos.write(1, b'y' * 50_000_000)\n",
            stdout_truncated),
    Program("invalid_utf8",
            "import sys\nsys.stdout.buffer.write(b'ok \\xff\\xfe\\xc3( \\xed\\xa0\\x80')\n",
            decoded_safely),
    Program("nul_bytes_in_output", "print('a\\0b')\n", printed("a\0b\n")),
    Program("nul_bytes_in_code", "x = 1\0\n",
            raised("source code string cannot contain null bytes")),
    Program("close_fds_0_1_2", "import os\nfor fd in (0, 1, 2):\n    os.close(fd)\n", ok),
    Program("replace_sys_stdout",
            "import io, sys\nsys.stdout = io.StringIO()\nsys.stderr = None\nprint('hidden')\n",
            printed("")),
    Program("monkeypatch_builtins",
            "import builtins, os, json\nbuiltins.print = None\nbuiltins.__import__ = None\n"
            "builtins.exec = None\nos.write = None\njson.dumps = None\n", ok),
    Program("stdin_read", "print(repr(input()))\n", raised("EOFError")),
    Program("change_cwd", "import os\nos.chdir('/')\nprint(os.getcwd())\n", printed("/\n")),
    # Escapes.
    Program("signal_the_parent",
            "import os, signal\n"
            + "".join(attempt(f"signal {s}", f"os.kill(os.getppid(), signal.{s})")
                      for s in ("SIGKILL", "SIGTERM", "SIGSTOP", "SIGINT")),
            all_refused, needs=("seccomp", "user")),
    Program("kill_everyone", "import os, signal\n" + attempt("kill -1",
            "os.kill(-1, signal.SIGKILL)"), all_refused, needs=("seccomp", "user")),
    Program("kill_the_parents_pid_by_number",
            "import ctypes, os, signal\nppid = os.getppid()\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            + attempt("pidfd", "signal.pidfd_send_signal(os.pidfd_open(ppid), signal.SIGKILL)")
            + attempt("tgkill", "if libc.tgkill(ppid, ppid, signal.SIGKILL) != 0:\n"
                                "    raise OSError(ctypes.get_errno(), 'tgkill')")
            + attempt("kill", "os.kill(ppid, signal.SIGKILL)"), all_refused,
            needs=("seccomp", "user")),
    Program("write_outside_the_workdir",
            "import os\n" + "".join(attempt(path, f"open({path!r}, 'a').close()") for path in
                                    ("/etc/passwd", "/usr/coding-gym-hostile",
                                     "/var/tmp/coding-gym-hostile", "/root/coding-gym-hostile"))
            + attempt("executable", "open(__import__('sys').executable, 'ab').close()"),
            all_refused, needs=("filesystem",)),
    Program("read_the_parents_secrets",
            "import os\nprint(sorted(os.environ))\nfor pid in os.listdir('/proc'):\n"
            "    try:\n        print(open(f'/proc/{pid}/environ').read())\n"
            "    except OSError:\n        pass\n", no_secret),
    Program("network_connect",
            "import socket\n" + attempt("tcp", "socket.create_connection(('127.0.0.1', {port}), "
                                               "timeout=1).close()")
            + attempt("tcp6", "socket.create_connection(('::1', {port}), timeout=1).close()"),
            all_refused, needs=("network", "seccomp")),
    Program("dns_query",
            "import socket\nquery = bytes.fromhex('123401000001000000000000076578616d706c65'"
            "'03636f6d0000010001')\n"
            + attempt("udp", "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                             "s.sendto(query, ('127.0.0.1', {udp_port}))"),
            all_refused, needs=("network", "seccomp")),
    Program("escape_syscalls",
            "import ctypes, os\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            "for name, args in [('unshare', (0x10000000,)), ('unshare', (0x40000000,)),\n"
            "                   ('mount', (b'none', b'/', None, 32, None)),\n"
            "                   ('chroot', (b'/tmp',)), ('setuid', (0,))]:\n"
            "    result = getattr(libc, name)(*args)\n"
            "    print(name, 'refused' if result == -1 else 'allowed')\n",
            all_refused, needs=("seccomp",)),
    Program("fill_tmp", "with open('/tmp/fill', 'wb') as f:\n    while True:\n"
                        "        f.write(bytes(1 << 20))\n", raised("OSError")),
    Program("fill_the_workdir", "chunk = bytes(1 << 20)\ni = 0\nwhile True:\n"
                                "    with open(f'fill-{i}', 'wb') as f:\n"
                                "        for _ in range(8):\n            f.write(chunk)\n"
                                "    i += 1\n", timeout),
    Program("open_100k_fds", "files = []\nfor _ in range(100_000):\n"
                             "    files.append(open('/dev/null'))\n",
            raised("OSError", "Too many open files")),
    Program("garbage_on_every_fd",
            "import os\nfor fd in range(3, 1024):\n    try:\n        os.write(fd, b'\\xff' * 64)\n"
            "    except OSError:\n        pass\n", stopped),
    Program("exit_with_odd_codes", "raise SystemExit(300)\n",
            lambda o: (assert_exit(o, 44))),
]


def assert_exit(outcome: Outcome, status: int) -> None:
    assert outcome.exit_code == status and outcome.info["kill_reason"] is None, outcome
    assert not outcome.info["state_lost"], outcome
