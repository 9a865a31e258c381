"""A spare child of the zygote: from its fork to the worker it becomes.

Forked ahead of any request (see ``zygote_loop.py``), the spare does, while it waits, every
part of a new worker's start-up that no request decides: it enters the namespaces of its
kind (``walls.py``), gets fresh random state, sets the last worker's environment (the next
one differs in its directory alone), takes the copy-on-write faults of a start-up and of a
first step (a whole step rehearsed through a throwaway worker), and counts its threads.
Then a request makes it the episode's worker: it joins the episode's cgroups by itself,
starts a session of its own, moves to the episode's directory and environment, and runs the
same start-up path as a spawned worker (:func:`coding_gym.sandbox.worker.start`).

Standard library only, like the zygote.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from coding_gym.sandbox import isolation, walls, worker
from coding_gym.sandbox.libc import set_process_name

#: Process name (``ps -o comm``, /proc/PID/comm) of a spare, until it becomes a worker.
NAME = "cg-zygote-spare"
#: Largest message on the zygote's channel and on a spare's socket, and most fds in one.
MAX_MESSAGE = 1 << 16
MAX_FDS = 8


def run(sock: socket.socket, kind: tuple[bool, bool], environment: dict[str, str],
        shed: Callable[[], None]) -> NoReturn:
    """In a child just forked by the zygote: ``shed`` the zygote's fds, prepare, wait on
    ``sock`` for a request, become its worker; exit when that worker's life ends (or the
    request never comes)."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        shed()
        set_process_name(NAME)
        set_environment(environment)
        _reseed()
        isolation.hold_session_priority()
        built = walls.build(*kind)
        # Measured on 2 CPUs: warming up at once, beside the worker started just before,
        # beats waiting for a quiet moment, which back-to-back resets never leave.
        warm = not select.select([sock], [], [], 0)[0]
        if warm:
            worker.warm_up()
            worker.rehearse()
        # Counted ahead too (a read of /proc, ~0.3 ms): nothing here starts a thread.
        single_threaded = _threads() == 1
        data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
        sock.close()
        if data and len(fds) >= 3:
            control, out, err, *joining = fds
            _become_worker(json.loads(data), control, out, err, warm, built, joining,
                           single_threaded)
        code = 0
    except BaseException:  # noqa: BLE001 - the parent reads it from the stderr pipe
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


def _become_worker(request: dict[str, Any], control: int, out: int, err: int,
                   warm: bool, built: walls.Walls, joining: list[int],
                   single_threaded: bool) -> None:
    """In a child of the zygote: take the episode's place, then serve it."""
    # Into the episode's cgroup first, by this process itself (see Cgroup.joining_fds); the
    # ready message says so, or the parent moves it.
    # "0" moves the calling thread alone: only a process of one thread joins that way.
    joined = bool(joining) and single_threaded
    for fd in joining:
        if joined:
            try:
                os.write(fd, b"0")
            except OSError:
                joined = False
        os.close(fd)
    set_process_name(os.path.basename(sys.executable))
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    os.setsid()
    os.chdir(request["workdir"])
    set_environment(request["environment"])
    worker.start(socket.socket(fileno=control), request["config"], warm=warm, walls=built,
                 joined_cgroup=joined)


def set_environment(wanted: dict[str, str]) -> None:
    """Make ``os.environ`` exactly ``wanted``, setting only what differs."""
    for name in [name for name in os.environ if name not in wanted]:
        del os.environ[name]
    for name, value in wanted.items():
        if os.environ.get(name) != value:
            os.environ[name] = value


def _threads() -> int:
    """The number of threads of this process (0 if it cannot be read)."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rfind(b")") + 2:].split()[17])
    except (OSError, ValueError, IndexError):
        return 0


def _reseed() -> None:
    """Fresh random state per worker: ``random`` reseeds itself at fork, NumPy does not."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
