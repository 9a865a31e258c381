"""The zygote process (see ``zygote.py`` for the side of the process that uses it).

Started by :class:`coding_gym.sandbox.zygote.Zygote`, it imports the modules to preload, warms
up the worker's step machinery, freezes its objects out of the garbage collector (so children
do not copy the pages it would touch), and then waits for requests.

A new worker is a child forked ahead (the *spare*, which drops the zygote's own sockets, gets
fresh random state, enters the namespaces its request will ask for (``walls.py``) and, unless
a request is already waiting, takes the copy-on-write faults of a start-up in advance). The
zygote *offers* each spare to the env's process: it sends the spare's pid and the socket its
request goes down (``SCM_RIGHTS``), and that process sends the request there itself, then
says so (``took``) with a status socket. So a reset wakes one process, not two. The zygote
then offers the next spare: one for each kind of namespaces requests have asked for (at most
four: network and filesystem layers on or off), so envs of different isolation in one process
each find theirs ready. Without an offer in hand (or when its spare is gone), the env sends
the request to the zygote (``fork``), which forks a child for it at once and reports its pid
on the status socket first. A request carries the new worker's control socket, stdout and
stderr pipes. The spare starts a new session, moves to the episode's directory and environment
and runs the same start-up path as a spawned worker (:func:`coding_gym.sandbox.worker.start`),
completing its isolation. On the status socket the zygote reports the worker's exit status
once it reaps it: the worker is the zygote's child, not the env's, and only a parent can learn
how a process ended. It is a child subreaper too, so
copies of workers (snapshots and forks, forked beside the worker) land here and are reaped and
reported the same way.

The zygote stays single-threaded (a fork copies only the calling thread): it refuses to serve
if the preloaded modules started threads. It exits when every process holding the other end
of its channel has closed it, killing the workers it still has.

Standard library only: the zygote process loads this module without the rest of the package.
"""

from __future__ import annotations

import collections
import gc
import importlib
import json
import os
import select
import signal
import socket
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from coding_gym.sandbox import isolation, walls, worker
from coding_gym.sandbox.libc import libc

MAX_MESSAGE = 1 << 16
_MAX_FDS = 8
_REMEMBERED_EXITS = 4096
#: Process names (``ps -o comm``, /proc/PID/comm) of the zygote and of its spare child.
ZYGOTE_NAME = "cg-zygote"
SPARE_NAME = "cg-zygote-spare"
_PR_SET_NAME = 15
#: The namespaces of the first spare: those of the default isolation.
_DEFAULT_WALLS = (True, True)


def main(argv: list[str]) -> None:
    """Entry point of the zygote process: ``argv`` is [channel fd, settings as JSON]."""
    channel = socket.socket(fileno=int(argv[0]))
    settings = json.loads(argv[1])
    imported, failed = [], {}
    for name in settings["preload"]:
        try:
            importlib.import_module(name)
            imported.append(name)
        except BaseException as e:  # noqa: BLE001 - reported, and the zygote serves anyway
            failed[name] = f"{type(e).__name__}: {e}"
    _set_process_name(ZYGOTE_NAME)
    worker.warm_up()
    isolation.prepare()
    # Copies of workers (snapshots, forks) are orphaned on purpose: adopt and reap them here.
    isolation.become_subreaper()
    _Loop(channel).serve({
        "type": "ready", "pid": os.getpid(), "imported": imported, "failed": failed,
        "threads": len(os.listdir("/proc/self/task")), "vm_bytes": _vm_bytes(),
    })


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


class _Loop:
    """The zygote's single-threaded loop: fork on request, reap on SIGCHLD, report exits."""

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.watchers: dict[int, socket.socket] = {}
        self.exits: collections.OrderedDict[int, int] = collections.OrderedDict()
        #: (network, filesystem) namespaces -> pid of the spare built for them, offered to
        #: the env's process (which holds its socket) and not taken yet.
        self.spares: dict[tuple[bool, bool], int] = {}
        #: The environment of the last worker: a spare sets it ahead, for the next one
        #: differs in its directory alone (a first setting costs a child ~0.4 ms).
        self.environment: dict[str, str] = {}
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        self.poller = select.poll()
        self.poller.register(channel, select.POLLIN)
        self.poller.register(self.wake_r, select.POLLIN)

    def serve(self, ready: dict[str, Any]) -> None:
        # Everything imported so far is shared with every child: keep the collector off it.
        gc.freeze()
        self.channel.send(json.dumps(ready).encode())
        self._offer_spare(_DEFAULT_WALLS)
        while True:
            for fd, _ in self.poller.poll():
                if fd == self.wake_r:
                    self._drain_wakeups()
                    self._reap()
                elif fd == self.channel.fileno():
                    if not self._handle_request():
                        self._stop()
                        return
                else:
                    self._drop_watcher(fd)

    def _handle_request(self) -> bool:
        """Serve one request; False when the channel is closed."""
        try:
            data, fds, _, _ = socket.recv_fds(self.channel, MAX_MESSAGE, _MAX_FDS)
        except OSError:
            return False
        if not data:
            return False
        try:
            request = json.loads(data)
            command = request.get("cmd")
            walls_kind = walls.kind_of(request["config"]) if command == "fork" else None
        except (ValueError, KeyError, TypeError, AttributeError):
            command = None
        if command == "fork" and walls_kind is not None and len(fds) >= 4:
            self._remember_environment(request)
            self._hand_over(data, fds, walls_kind)
        elif command == "took" and len(fds) == 1:
            self._took(request, socket.socket(fileno=fds[0]))
        elif command == "watch" and len(fds) == 1:
            self._watch(int(request["pid"]), socket.socket(fileno=fds[0]))
        else:
            for fd in fds:
                os.close(fd)
        return True

    def _fork_spare(self, kind: tuple[bool, bool], inherited: Sequence[int] = ()
                    ) -> tuple[int, socket.socket] | None:
        """Fork a child that waits for a request for namespaces of ``kind``: its pid and the
        socket its request goes down, or None if the fork failed. ``inherited``: fds the
        zygote holds for the moment, which the child closes.

        Forking ahead moves the fork, the namespaces and the copy-on-write faults of a
        child's first moments out of the reset that waits for the worker.
        """
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            self._wait_as_spare(theirs, [ours.detach(), *inherited], kind)
        theirs.close()
        self.exits.pop(pid, None)
        return pid, ours

    def _offer_spare(self, kind: tuple[bool, bool]) -> None:
        """Fork the spare for the next request of ``kind``, unless one is on offer, and give
        the env's process its socket."""
        if kind in self.spares:
            return
        spare = self._fork_spare(kind)
        if spare is None:
            return  # the next request of this kind comes here, and says if forks still fail
        pid, sock = spare
        offer = json.dumps({"type": "spare", "pid": pid, "kind": list(kind)}).encode()
        try:
            socket.send_fds(self.channel, [offer], [sock.fileno()])
        except OSError:
            _kill(pid)  # the env's process is gone: the channel's end is near
        else:
            self.spares[kind] = pid
        finally:
            sock.close()

    def _hand_over(self, data: bytes, fds: list[int], kind: tuple[bool, bool]) -> None:
        """Serve a fork request sent here (the env had no spare of its kind on offer): fork a
        child for it now, then offer the next spare.

        ``fds``: the worker's control socket, stdout and stderr, the status socket, then
        the cgroup files the worker joins by itself (``Cgroup.joining_fds``), if any."""
        status = fds[3]
        worker_fds = [*fds[:3], *fds[4:]]
        status_sock = socket.socket(fileno=status)
        # Not the status socket in the child: its messages are the zygote's word.
        child = self._fork_spare(kind, inherited=fds)
        if child is None:
            _send_quietly(status_sock, {"type": "error", "message": "fork failed"})
            status_sock.close()
        else:
            pid, sock = child
            # The pid first: the parent moves it into its cgroup while it starts.
            _send_quietly(status_sock, {"type": "forked", "pid": pid})
            try:
                socket.send_fds(sock, [data], worker_fds)
            except OSError as e:
                _kill(pid)
                _send_quietly(status_sock, {"type": "error", "message": f"no child: {e}"})
                status_sock.close()
            else:
                self._add_watcher(pid, status_sock)
            sock.close()
        for fd in worker_fds:
            os.close(fd)
        self._offer_spare(kind)

    def _took(self, request: dict[str, Any], status_sock: socket.socket) -> None:
        """The env's process sent a request to the spare on offer itself: report that
        worker's exit on ``status_sock``, and offer the next spare."""
        pid, kind = request.get("pid"), request.get("kind")
        if not (isinstance(pid, int) and isinstance(kind, list) and len(kind) == 2):
            status_sock.close()
            return
        walls_kind = (bool(kind[0]), bool(kind[1]))
        if self.spares.get(walls_kind) == pid:
            del self.spares[walls_kind]
        self._remember_environment(request)
        self._watch(pid, status_sock)
        self._offer_spare(walls_kind)

    def _remember_environment(self, request: dict[str, Any]) -> None:
        if isinstance(request.get("environment"), dict):
            self.environment = request["environment"]

    def _wait_as_spare(self, sock: socket.socket, inherited: list[int],
                       kind: tuple[bool, bool]) -> None:
        """In a spare child: shed the zygote (and ``inherited``), wait for a request, become
        its worker."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            # Detach before closing: a socket object collected later would close whatever
            # fd then has the same number.
            for owned in (self.channel, *self.watchers.values()):
                os.close(owned.detach())
            for fd in (*inherited, self.wake_r, self.wake_w):
                os.close(fd)
            _set_process_name(SPARE_NAME)
            _set_environment(self.environment)
            _reseed()
            isolation.hold_session_priority()
            built = walls.build(*kind)
            # Measured on 2 CPUs: warming up at once, beside the worker started just before,
            # beats waiting for a quiet moment, which back-to-back resets never leave.
            warm = not select.select([sock], [], [], 0)[0]
            if warm:
                _warm_up()
            # Counted ahead too (a read of /proc, ~0.3 ms): nothing here starts a thread.
            single_threaded = _threads() == 1
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE, _MAX_FDS)
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

    def _watch(self, pid: int, status_sock: socket.socket) -> None:
        if pid in self.exits:
            _send_quietly(status_sock, {"type": "exit", "returncode": self.exits.pop(pid)})
            status_sock.close()
        else:
            self._add_watcher(pid, status_sock)

    def _add_watcher(self, pid: int, status_sock: socket.socket) -> None:
        self.watchers[pid] = status_sock
        # Readable only when the env closes its end: then nobody wants the status any more.
        self.poller.register(status_sock, select.POLLIN)

    def _drop_watcher(self, fd: int) -> None:
        for pid, sock in list(self.watchers.items()):
            if sock.fileno() == fd:
                self.poller.unregister(fd)
                del self.watchers[pid]
                sock.close()

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self.wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            returncode = os.waitstatus_to_exitcode(status)
            for kind, spare in list(self.spares.items()):
                if spare == pid:
                    del self.spares[kind]  # its offer is void: the next request comes here
            sock = self.watchers.pop(pid, None)
            if sock is None:
                self.exits[pid] = returncode
                while len(self.exits) > _REMEMBERED_EXITS:
                    self.exits.popitem(last=False)
                continue
            self.poller.unregister(sock)
            _send_quietly(sock, {"type": "exit", "returncode": returncode})
            sock.close()

    def _stop(self) -> None:
        """The env's process is gone or done: take the workers down with the zygote."""
        for pid in [*self.watchers, *self.spares.values()]:
            _kill(pid)


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
    _set_process_name(os.path.basename(sys.executable))
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    os.setsid()
    os.chdir(request["workdir"])
    _set_environment(request["environment"])
    worker.start(socket.socket(fileno=control), request["config"], warm=warm, walls=built,
                 joined_cgroup=joined)


def _set_environment(wanted: dict[str, str]) -> None:
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


def _kill(pid: int) -> None:
    """SIGKILL a child of the zygote and its process group (a worker leads one of its own,
    from its first moments; a spare does not yet)."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, signal.SIGKILL)
        except OSError:
            pass


def _set_process_name(name: str) -> None:
    """Through the process's one C library handle: the zygote names itself first, so its
    children find ``prctl`` looked up (a new handle would build a ctypes class in each)."""
    try:
        libc().prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _send_quietly(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass


def _warm_up() -> None:
    """Take now, while idle, the copy-on-write faults a new worker's start-up and first step
    would take: run the step machinery, and a step through a throwaway worker."""
    worker.warm_up()
    worker.rehearse()


def _reseed() -> None:
    """Fresh random state per worker: ``random`` reseeds itself at fork, NumPy does not."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
