"""A saved episode of :class:`coding_gym.env.CodingEnv`: its interpreter and the env's own
state (step count, episode id, task, ``np_random``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from coding_gym.backends.episode import Snapshot

SavedRng = tuple[type[np.random.BitGenerator], Mapping[str, Any]]


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
