"""An unprivileged uid per episode: leased by the parent, taken on by the worker.

Every episode gets a uid (and a gid of the same number) that no other live episode and no
account on the machine uses, so code of one episode cannot signal, trace or read the
processes and files of another, nor those of the user running the env: the kernel's ordinary
permission checks do the work. With a uid of its own, ``RLIMIT_NPROC`` also becomes a real
per-episode process cap.

Uids come from :data:`UID_RANGE`. A lease is an abstract Unix socket bound to a name derived
from the uid: binding is atomic across every process on the machine (of the same network
namespace), and the kernel releases the name when the socket closes, even if its owner is
killed, so a crash leaks nothing. Needs root (``CAP_SETUID``) in the worker.
"""

from __future__ import annotations

import os
import socket

#: Uids handed to episodes: far above the ranges of real accounts (1000+) and of the
#: subordinate ids of rootless containers (100000+ in steps of 65536).
UID_RANGE = range(2_000_000_000, 2_000_000_000 + (1 << 20))


class UidLease:
    """A uid reserved for one episode until :meth:`release` (or garbage collection)."""

    def __init__(self, uid: int, sock: socket.socket) -> None:
        self.uid = uid
        self._sock: socket.socket | None = sock

    @classmethod
    def acquire(cls, attempts: int = 64) -> UidLease:
        """Reserve a free uid of :data:`UID_RANGE`; OSError when none could be had."""
        last_error: OSError | None = None
        for _ in range(attempts):
            uid = UID_RANGE[int.from_bytes(os.urandom(4), "little") % len(UID_RANGE)]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                sock.bind(f"\0coding-gym/uid/{uid}")
            except OSError as e:
                sock.close()
                last_error = e
                continue
            return cls(uid, sock)
        raise OSError(f"no free sandbox uid after {attempts} attempts: {last_error}")

    def release(self) -> None:
        """Give the uid back; safe to call twice."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def drop(uid: int) -> None:
    """Become ``uid``/``uid`` with no supplementary groups, for good (needs root)."""
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    # The kernel now marks the process non-dumpable: no core file reaches a core_pattern
    # handler running as root, and /proc/<pid> of the worker stays root's.
    os.setresuid(uid, uid, uid)
