"""What a :class:`~coding_gym.backends.local.LocalBackend` holds for its episode: the
directory and uid its interpreter and that interpreter's copies share, the snapshots taken,
the live worker and the cgroups. Released by ``close`` or by garbage collection, so that no
process outlives the backend.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import weakref

from coding_gym.sandbox.cgroups import Cgroup
from coding_gym.sandbox.frozen import FrozenCopy
from coding_gym.sandbox.supervisor import WorkerProcess
from coding_gym.sandbox.uids import UidLease

logger = logging.getLogger(__name__)


class Home:
    """An episode's directory and uid, shared by its interpreter's copies (snapshots, forks).

    Removed, and the uid given back, when the last of them lets go: a copy keeps the directory
    of the interpreter it copies (the filesystem layer binds it at its own path) and its uid.
    """

    def __init__(self, uid_lease: UidLease | None) -> None:
        self.path = tempfile.mkdtemp(prefix="coding-gym-")
        self.uid_lease = uid_lease
        self._users = 1
        self._lock = threading.Lock()

    @classmethod
    def make(cls, with_uid: bool) -> Home:
        """A new directory, and a uid of its own if ``with_uid`` (the user layer) and this
        process is root. A reset makes the next reset's while its worker starts: both cost a
        reset ~0.3 ms otherwise."""
        lease = None
        if with_uid and os.geteuid() == 0:
            try:
                lease = UidLease.acquire()
            except OSError as e:
                logger.warning("no uid for the episode, the user layer is off: %s", e)
        return cls(lease)

    @property
    def uid(self) -> int | None:
        return self.uid_lease.uid if self.uid_lease is not None else None

    def share(self) -> Home:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last:
            shutil.rmtree(self.path, ignore_errors=True)
            # Last: the uid may go to another episode only once no process of this one is left.
            if self.uid_lease is not None:
                self.uid_lease.release()


class Snapshot:
    """A saved interpreter: give it to :meth:`LocalBackend.restore`, as many times as needed.

    It is a frozen copy-on-write fork of the worker, so it costs little memory until the live
    interpreter diverges. It lasts until :meth:`release` (or the ``with`` block, or garbage
    collection), or until the backend that took it is closed.
    """

    def __init__(self, copy: FrozenCopy, home: Home) -> None:
        self.copy = copy
        self.home = home
        self._finalizer = weakref.finalize(self, _release_snapshot, copy, home, os.getpid())

    @property
    def released(self) -> bool:
        return not self._finalizer.alive

    def release(self) -> None:
        """Free the frozen process; safe to call twice."""
        self._finalizer()

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _release_snapshot(copy: FrozenCopy, home: Home, owner: int) -> None:
    if os.getpid() == owner:  # not in a forked child of the owner: the processes are not its
        copy.release()
        home.release()


class Episode:
    """Everything a backend holds: released by close or GC, so no process outlives it."""

    def __init__(self) -> None:
        self.owner = os.getpid()
        self.worker: WorkerProcess | None = None
        self.home: Home | None = None
        #: The directory and uid of the next reset, made ahead.
        self.next_home: Home | None = None
        self.cgroup: Cgroup | None = None
        self.parking: Cgroup | None = None
        self.snapshots: weakref.WeakSet[Snapshot] = weakref.WeakSet()

    def release_interpreter(self) -> None:
        home = self.stop_interpreter()
        if home is not None:
            home.release()

    def stop_interpreter(self) -> Home | None:
        """Kill the live worker and everything it started; the home it leaves, for the
        caller to release (a reset does that while the next worker starts)."""
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        home, self.home = self.home, None
        return home

    def release(self) -> None:
        if os.getpid() != self.owner:
            # A forked child of the owner collecting its copy of the backend: the worker, the
            # directory and the cgroups are the owner's, and stay.
            return
        self.release_interpreter()
        if self.next_home is not None:
            self.next_home.release()
            self.next_home = None
        for snapshot in list(self.snapshots):
            snapshot.release()
        for group in (self.cgroup, self.parking):
            if group is not None:
                group.kill()
                group.remove()
        self.cgroup = self.parking = None
