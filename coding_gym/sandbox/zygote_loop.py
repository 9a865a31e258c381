"""The zygote process (see ``zygote.py`` for the side of the process that uses it).

Started by :class:`coding_gym.sandbox.zygote.Zygote`, it imports the modules to preload, warms
up the worker's step machinery, freezes its objects out of the garbage collector (so children
do not copy the pages it would touch), and then waits for requests.

A new worker is a child forked ahead: the *spare* (``spare.py``), which does while it waits the
part of a worker's start-up that no request decides. The zygote *offers* each spare to the
env's process: it sends the spare's pid and the socket its request goes down (``SCM_RIGHTS``),
and that process sends the request there itself, then says so (``took``) with a status socket.
So a reset wakes one process, not two. The zygote then offers the next spare: one for each kind
of namespaces requests have asked for (at most four: network and filesystem layers on or off),
so envs of different isolation in one process each find theirs ready. Without an offer in hand
(or when its spare is gone), the env sends the request to the zygote (``fork``), which forks a
child for it at once and reports its pid on the status socket first. A request carries the new
worker's control socket, stdout and stderr pipes. On the status socket the zygote reports the
worker's exit status once it reaps it: the worker is the zygote's child, not the env's, and
only a parent can learn how a process ended. It is a child subreaper too, so copies of workers
(snapshots and forks, forked beside the worker) land here and are reaped and reported the same
way.

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
from collections.abc import Sequence
from typing import Any

from coding_gym.sandbox import isolation, spare, walls, worker
from coding_gym.sandbox.libc import set_process_name
from coding_gym.sandbox.spare import MAX_FDS, MAX_MESSAGE

_REMEMBERED_EXITS = 4096
#: Process name (``ps -o comm``, /proc/PID/comm) of the zygote; its spare's is spare.NAME.
ZYGOTE_NAME = "cg-zygote"
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
    set_process_name(ZYGOTE_NAME)
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
            data, fds, _, _ = socket.recv_fds(self.channel, MAX_MESSAGE, MAX_FDS)
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
            inherited = [ours.detach(), *inherited]
            spare.run(theirs, kind, self.environment, shed=lambda: self._shed(inherited))
        theirs.close()
        self.exits.pop(pid, None)
        return pid, ours

    def _offer_spare(self, kind: tuple[bool, bool]) -> None:
        """Fork the spare for the next request of ``kind``, unless one is on offer, and give
        the env's process its socket."""
        if kind in self.spares:
            return
        child = self._fork_spare(kind)
        if child is None:
            return  # the next request of this kind comes here, and says if forks still fail
        pid, sock = child
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

    def _shed(self, inherited: list[int]) -> None:
        """In a child just forked: close the zygote's fds (and ``inherited``)."""
        # Detach before closing: a socket object collected later would close whatever fd
        # then has the same number.
        for owned in (self.channel, *self.watchers.values()):
            os.close(owned.detach())
        for fd in (*inherited, self.wake_r, self.wake_w):
            os.close(fd)

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
            for kind, offered in list(self.spares.items()):
                if offered == pid:
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


def _kill(pid: int) -> None:
    """SIGKILL a child of the zygote and its process group (a worker leads one of its own,
    from its first moments; a spare does not yet)."""
    for send in (os.killpg, os.kill):
        try:
            send(pid, signal.SIGKILL)
        except OSError:
            pass


def _send_quietly(sock: socket.socket, message: dict[str, Any]) -> None:
    try:
        sock.send(json.dumps(message).encode())
    except OSError:
        pass
