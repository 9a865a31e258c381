"""A session of the server: one client's episode on its own LocalBackend (see
:mod:`coding_gym.server.sessions` for how they are opened, run and closed)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from coding_gym.backends.local import LocalBackend
from coding_gym.models import ExecResult, Limits
from coding_gym.server import stepping


class Session:
    """One client's episode on its own :class:`LocalBackend`.

    The methods that touch the backend block; :class:`SessionManager` runs them in its pool.
    """

    def __init__(self, session_id: str, limits: Limits,
                 backend: LocalBackend | None = None) -> None:
        self.id = session_id
        self.limits = limits
        self.backend = LocalBackend(limits, start_ahead=False) if backend is None else backend
        #: Its interpreter was started ahead (see ``ahead.py``) and has run nothing yet.
        self.fresh = backend is not None
        #: The loop's readers on the backend's worker; stopped before any thread uses it.
        self.watch = stepping.WorkerWatch()
        self.episode_id: str | None = None
        self.step_count = 0
        self.last_exit_code: int | None = None
        self.last_active = time.monotonic()
        #: When the last call of the client ended.
        self.answered_at = 0.0
        #: The turn is held by a call of the client (not by the server's own).
        self.serving_client = False
        self.busy = False
        #: Its client left or it is being closed: its slot is about to be free.
        self.closing = False
        self.lock = asyncio.Lock()
        #: Set by the owner of a connection: ends it when the session is reaped.
        self.on_expire: Callable[[], Awaitable[None]] | None = None

    def reset(self, seed: int | None = None, episode_id: str | None = None) -> dict[str, Any]:
        """Start a fresh interpreter (unless it is fresh already) and a new episode; the
        reset reply. Blocks only when it starts an interpreter."""
        if not self.fresh:  # fresh until code runs in it (record)
            self.backend.reset()
        self.episode_id = episode_id or new_episode_id(seed)
        self.step_count = 0
        self.last_exit_code = None
        return reset_reply(self.episode_id)

    def step(self, code: str, timeout_s: float | None = None,
             asked_at: float | None = None) -> dict[str, Any]:
        """Run ``code`` (starting an episode first if none has started); the step reply.
        The time limit counts from ``asked_at`` (see :meth:`LocalBackend.run`)."""
        if self.episode_id is None:
            self.reset()
        # Begun as the event loop begins steps (and not with LocalBackend.run): the server's
        # threads take turns with many workers, which none of them may pin to its own CPU.
        step = self.backend.begin(code, timeout_s=self.limit_s(timeout_s), asked_at=asked_at)
        return self.record(self.backend.finish(step, step.wait()))

    def limit_s(self, timeout_s: float | None) -> float:
        """The time limit of a step: a client may shorten the server's, never lengthen it."""
        return self.limits.timeout_s if timeout_s is None else min(timeout_s,
                                                                   self.limits.timeout_s)

    def record(self, result: ExecResult) -> dict[str, Any]:
        """Count a step of this episode; its reply."""
        self.fresh = False
        self.step_count += 1
        self.last_exit_code = result.exit_code
        info = result.info()
        info.update(episode_id=self.episode_id, step=self.step_count)
        return {
            "observation": {"stdout": result.stdout, "stderr": result.stderr,
                            "exit_code": result.exit_code},
            "reward": 0.0,
            "done": False,
            "info": info,
        }

    def state(self) -> dict[str, Any]:
        """The state reply: episode id, steps taken, last exit code."""
        return {"episode_id": self.episode_id, "step_count": self.step_count,
                "last_exit_code": self.last_exit_code}

    def swap(self, backend: LocalBackend) -> LocalBackend:
        """Take ``backend``, whose interpreter was started ahead, in place of the session's
        own; returns that one, to be closed. Not while a thread uses the session."""
        self.watch.stop()
        old, self.backend, self.fresh = self.backend, backend, True
        return old

    def interrupt(self) -> None:
        """Kill the running interpreter now; thread-safe."""
        self.backend.interrupt()

    def close(self) -> None:
        """Kill the interpreter and remove its directory."""
        self.backend.close()


def new_episode_id(seed: int | None = None) -> str:
    """A random episode id, or one derived from ``seed`` so that a seeded reset repeats it."""
    if seed is None:
        return uuid.uuid4().hex
    return uuid.UUID(bytes=random.Random(seed).randbytes(16), version=4).hex


def reset_reply(episode_id: str) -> dict[str, Any]:
    """The reply to a reset: empty output, exit code 0, no reward yet."""
    return {
        "observation": {"stdout": "", "stderr": "", "exit_code": 0},
        "reward": None,
        "done": False,
        "info": {"episode_id": episode_id, "step": 0},
    }
