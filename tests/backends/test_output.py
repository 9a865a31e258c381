"""What a step's code writes: stdout and stderr through fds 1 and 2, their order, limits and
encoding, and streams that the code closed, patched or redirected (see sandbox/streams.py)."""

from __future__ import annotations

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits


def test_large_output_is_truncated_and_flagged():
    with LocalBackend(Limits(max_output_bytes=100_000)) as backend:
        backend.reset()
        result = backend.run(
            "import sys\nsys.stdout.write('x' * 20_000_000)\nprint('err', file=sys.stderr)"
        )
        assert result.stdout_truncated
        assert len(result.stdout) == 100_000
        assert not result.stderr_truncated and result.stderr == "err\n"
        assert result.exit_code == 0


def test_invalid_utf8_and_nul_bytes_are_decoded_safely(backend):
    result = backend.run("import os\nos.write(1, b'a\\xff\\xfeb\\x00c')\nprint('\\x00é')")
    assert result.stdout == "a\ufffd\ufffdb\x00c\x00é\n"
    result.stdout.encode("utf-8")  # no lone surrogates


def test_lone_surrogates_in_code_and_output(backend):
    result = backend.run("s = '\\ud800'\nprint(s)")
    assert result.exit_code == 0
    result.stdout.encode("utf-8")


def test_output_of_child_processes_and_c_code_is_captured(backend):
    result = backend.run(
        "import os, subprocess, ctypes\n"
        "os.system('echo from-shell; echo to-err 1>&2')\n"
        "subprocess.run(['echo', 'from-child'])\n"
        "ctypes.CDLL(None).printf(b'from-c\\n')"
    )
    assert "from-shell\n" in result.stdout
    assert "from-child\n" in result.stdout
    assert "from-c\n" in result.stdout
    assert "to-err\n" in result.stderr


def test_stdout_keeps_its_order_with_what_is_written_to_fd_1(backend):
    # print is buffered as Python's stdout is on a pipe; a flush sends it to fd 1 first, in
    # order with os.write, child processes and C code.
    result = backend.run(
        "import os, subprocess, sys\n"
        "print('one', flush=True)\n"
        "os.write(1, b'two\\n')\n"
        "print('three'); sys.stdout.flush()\n"
        "subprocess.run(['echo', 'four'])\n"
        "print('five')"
    )
    assert result.stdout == "one\ntwo\nthree\nfour\nfive\n"


# Lines of 8 bytes: 1024 of them fill the text layer's 8 kB chunk, which it then writes.
@pytest.mark.parametrize("lines", [1, 1000, 1025, 20_000])
def test_stdout_of_any_size_arrives_whole_and_in_order(backend, lines):
    result = backend.run(f"for i in range({lines}): print(f'{{i:07d}}')")
    assert result.stdout == "".join(f"{i:07d}\n" for i in range(lines))


def test_output_follows_fd_1_where_the_program_points_it(backend):
    result = backend.run(
        "import os\nf = open('out.txt', 'w')\nos.dup2(f.fileno(), 1)\nprint('to the file')"
    )
    assert result.stdout == ""
    assert backend.run("print(open('out.txt').read(), end='')").stdout == "to the file\n"


def test_a_small_output_limit_cuts_stdout():
    with LocalBackend(Limits(max_output_bytes=10)) as backend:
        backend.reset()
        result = backend.run("print('x' * 100)")
        assert result.stdout == "x" * 10 and result.stdout_truncated


def test_a_closed_stdout_or_stderr_is_back_at_the_next_step(backend):
    backend.run("import sys\nsys.stdout.close()\nsys.stderr.close()")
    result = backend.run(
        "import sys\nprint('out', sys.stdout.fileno())\nprint('err', file=sys.stderr)"
    )
    assert (result.stdout, result.stderr, result.exit_code) == ("out 1\n", "err\n", 0)


@pytest.mark.parametrize("patch", [
    "sys.stdout.buffer.write = lambda data: len(data)",
    "sys.stderr.buffer.write = lambda data: len(data)",
    "sys.stdout.buffer.close()",
])
def test_a_patched_stdout_is_mended_at_the_next_step(backend, patch):
    backend.run(f"import sys\n{patch}\nprint('maybe lost')")
    result = backend.run("import sys\nprint('out')\nprint('err', file=sys.stderr)")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_stdin_is_empty(backend):
    result = backend.run("import sys\nprint(repr(sys.stdin.read()))")
    assert result.stdout == "''\n"


def test_monkeypatched_streams_and_fds_are_restored(backend):
    backend.run("import sys, io, os\nsys.stdout = io.StringIO()\nos.close(2)")
    result = backend.run("print('visible')\nimport sys\nprint('err', file=sys.stderr)")
    assert result.stdout == "visible\n" and result.stderr == "err\n"
