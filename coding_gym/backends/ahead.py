"""The next episode's interpreter, started in the background while the current one runs.

A reset of a :class:`~coding_gym.backends.local.LocalBackend` costs 3-5 ms on its own: a
worker forked from the zygote's spare joins the episode's cgroups and directory and starts up
there. With ``start_ahead`` (the default), the backend keeps a second, hidden backend of the
same kind whose interpreter is started: a reset trades the two interpreters (worker, directory,
uid and cgroup), and the hidden backend then closes the old one and starts the next in a
thread, in the time the agent takes to write its next program. A reset that comes before
that start is done waits for it, which takes no longer than starting its own.

The price is a second idle interpreter per backend (its memory is mostly shared with the
zygote: see the memory benchmark).
"""

from __future__ import annotations

import _thread
import logging
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coding_gym.backends.episode import Episode
    from coding_gym.backends.local import LocalBackend

logger = logging.getLogger(__name__)

#: How long after a reset the next interpreter starts. Started at once, its start-up ran
#: beside the first step of the episode just begun, on the same two CPUs, and slowed it.
START_DELAY_S = 0.01


class NextInterpreter:
    """A hidden ``backend`` (``start_ahead=False``) whose interpreter the owner's next reset
    takes (see the module's docstring).

    Called from the owner's thread; the start runs in a thread of its own, one at a time. A
    bare thread (``_thread``): ``threading.Thread.start`` waits for the new thread to run,
    which took 130-180 µs of a 250 µs reset, against 40 µs.
    """

    def __init__(self, backend: LocalBackend) -> None:
        self.backend = backend
        self._owner = os.getpid()
        self._lock = threading.Lock()
        #: Set while no start is under way.
        self._done = threading.Event()
        self._done.set()
        #: The thread of the start under way.
        self._runner: int | None = None
        #: Set to start at once: a reset waits for the start, or the owner closes.
        self._hurry = threading.Event()
        self._closed = False

    def trade(self, episode: Episode) -> bool:
        """Give ``episode`` the interpreter started ahead, in exchange for its own, whose
        processes stop at once (none runs after the reset) and are killed, reaped and their
        directory removed in the background, before the next start; False if none is ready
        (the episode is then untouched)."""
        self._wait()
        mine = self.backend._episode
        worker = mine.worker
        if worker is None or not worker.idle():  # never started, or it died while it waited
            return False
        episode.worker, mine.worker = worker, episode.worker
        episode.home, mine.home = mine.home, episode.home
        episode.cgroup, mine.cgroup = mine.cgroup, episode.cgroup
        if mine.worker is not None:
            # Killed now, their exits ran beside the new episode's first step: 1.3 against
            # 0.4 ms.
            mine.worker.stop()
        return True

    def start_soon(self) -> None:
        """Start the next interpreter :data:`START_DELAY_S` from now, in the background (after
        closing the one given back by :meth:`trade`, if any)."""
        self._wait()
        with self._lock:
            if self._closed:
                return
            self._done.clear()
        self._hurry.clear()
        _thread.start_new_thread(self._start, ())

    def _start(self) -> None:
        self._runner = threading.get_ident()
        backend = self.backend
        try:
            self._hurry.wait(START_DELAY_S)
            # The interpreter given back goes first, with its directory and uid: its kill
            # frees the cgroup that the next one joins.
            backend._episode.release_interpreter()
            backend.reset()
        except Exception as e:  # noqa: BLE001 - the owner's reset starts its own, and says why
            logger.info("no interpreter started ahead: %s", e)
        finally:
            with self._lock:
                closed = self._closed
            if closed:
                backend.close()
            self._runner = None
            self._done.set()

    def _wait(self) -> None:
        """Wait for a start under way, asking it not to wait for its delay (not in a forked
        child of the owner, where that start's thread does not exist)."""
        if not self._done.is_set() and os.getpid() == self._owner:
            self._hurry.set()
            self._done.wait()

    def close(self) -> None:
        """Close the hidden backend, once a start under way is done (safe to call twice, and
        from a garbage collection in the start's own thread, which then closes it)."""
        with self._lock:
            self._closed = True
        if self._runner == threading.get_ident():
            return  # in the start's own thread: it closes the backend on its way out
        self._wait()
        self.backend.close()
