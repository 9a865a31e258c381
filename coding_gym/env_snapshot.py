"""A saved episode of :class:`coding_gym.env.CodingEnv`: its interpreter and the env's own
state (step count, episode id, task, ``np_random``); and the env's snapshot methods, which it
mixes in (:class:`EpisodeSnapshots`)."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from gymnasium.error import ResetNeeded

from coding_gym.errors import SnapshotError

if TYPE_CHECKING:
    from coding_gym.backends import Backend
    from coding_gym.backends.episode import Snapshot
    from coding_gym.backends.local import LocalBackend
    from coding_gym.models import ExecResult, Limits
    from coding_gym.tasks.episode import TaskEpisodes

SavedRng = tuple[type[np.random.BitGenerator], Mapping[str, Any]]
#: The env class that mixes :class:`EpisodeSnapshots` in (its fork returns one of it).
_Env = TypeVar("_Env", bound="EpisodeSnapshots")


class EnvSnapshot:
    """A saved episode of a :class:`CodingEnv`, from :meth:`CodingEnv.snapshot`.

    Holds a frozen copy of the interpreter (a process, sharing memory copy-on-write) until
    :meth:`release`, the end of a ``with`` block, garbage collection, or the env's close.
    """

    def __init__(self, interpreter: Snapshot, episode: dict[str, Any]) -> None:
        self.interpreter = interpreter
        self.episode = episode

    def release(self) -> None:
        """Free the frozen interpreter; safe to call twice."""
        self.interpreter.release()

    def __enter__(self) -> EnvSnapshot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def saved_rng(rng: np.random.Generator) -> SavedRng:
    """The bit generator's kind and state: what :func:`restored_rng` needs. Not a deep copy
    of the Generator, which costs 100 µs, most of the env's share of a snapshot."""
    return type(rng.bit_generator), rng.bit_generator.state


def restored_rng(saved: SavedRng) -> np.random.Generator:
    """A new Generator in the state :func:`saved_rng` kept."""
    kind, state = saved
    bit_generator = kind()
    bit_generator.state = state
    return np.random.Generator(bit_generator)


class EpisodeSnapshots:
    """Snapshots of :class:`~coding_gym.env.CodingEnv`: the whole episode, interpreter
    included (local backend only)."""

    backend: Backend
    limits: Limits
    episode_id: str | None
    step_count: int
    _last: tuple[str, ExecResult] | None
    _tasks: TaskEpisodes | None
    if TYPE_CHECKING:
        np_random: np.random.Generator

    def snapshot(self) -> EnvSnapshot:
        """Save the episode: the interpreter (variables, imports, random state), the step
        count, the episode id, the task and its graded steps, and ``np_random``.

        Costs a fork of the interpreter (copy-on-write): a few milliseconds. Give the result
        to :meth:`restore`, as many times as needed; release it when done (or use ``with``).
        Files of the working directory are not saved.
        """
        backend = self._local_backend("snapshot")
        return EnvSnapshot(backend.snapshot(), self._episode_state())

    def restore(self, snapshot: EnvSnapshot) -> None:
        """Bring back the episode saved by :meth:`snapshot` (the snapshot stays usable)."""
        if not isinstance(snapshot, EnvSnapshot):
            raise TypeError(
                f"Expected an EnvSnapshot from CodingEnv.snapshot(), got {type(snapshot).__name__}"
            )
        self._local_backend("restore").restore(snapshot.interpreter)
        self._set_episode_state(snapshot.episode)

    def fork(self: _Env) -> _Env:
        """A new env in the same state as this one, interpreter included (copy-on-write).

        From then on the two are independent, except that they share the working directory.
        Close the new env like any other.
        """
        backend = self._local_backend("fork")
        clone = copy.copy(self)
        clone.backend = backend.fork()
        clone._set_episode_state(self._episode_state())
        if self._tasks is not None:
            from coding_gym.backends.local import LocalBackend
            from coding_gym.tasks.grading import Grader, grading_limits

            grader = Grader(LocalBackend(grading_limits(self.limits), backend.isolation,
                                         start_method=backend.start_method,
                                         preload=backend.preload,
                                         start_ahead=backend.start_ahead))
            clone._tasks = self._tasks.fork(grader)
        return clone

    def _local_backend(self, operation: str) -> LocalBackend:
        from coding_gym.backends.local import LocalBackend

        if not isinstance(self.backend, LocalBackend):
            raise SnapshotError(
                f"{operation}() needs the local backend, and this env runs on "
                f"{type(self.backend).__name__}"
            )
        if self.episode_id is None:
            raise ResetNeeded(f"Call reset() before {operation}(): no episode has started.")
        return self.backend

    def _episode_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "episode_id": self.episode_id,
            "step_count": self.step_count,
            "last": self._last,
            "np_random": saved_rng(self.np_random),
        }
        if self._tasks is not None:
            state["tasks"] = self._tasks.state()
        return state

    def _set_episode_state(self, state: dict[str, Any]) -> None:
        self.episode_id = state["episode_id"]
        self.step_count = state["step_count"]
        self._last = state["last"]
        self.np_random = restored_rng(state["np_random"])
        if self._tasks is not None and "tasks" in state:
            self._tasks.set_state(state["tasks"])
