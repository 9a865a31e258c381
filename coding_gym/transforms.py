"""Reward transforms: composable callables that shape a step's reward from its code and result.

A transform takes the step's code, its :class:`~coding_gym.models.ExecResult` and the reward so
far, and returns the new reward. ``CodingEnv(reward_transforms=[...])`` applies them in order,
starting from 0.0 in free execution and from the task reward in task mode. Any callable with
that signature works:

    >>> from coding_gym.models import ExecResult
    >>> def exit_bonus(code, result, reward):
    ...     return reward + (0.5 if result.exit_code == 0 else 0.0)
    >>> shape = Compose([SafetyPenalty(), exit_bonus])
    >>> shape("import os", ExecResult(), 0.0)
    -0.5

``reward_transforms="openenv"`` gives the shaping of OpenEnv's coding_env (see :func:`openenv`):
-1.0 for code that matches a dangerous pattern, +0.1 for code of at most 100 characters,
-0.2 for code that does not parse.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable, Sequence
from typing import Protocol

from coding_gym.models import ExecResult


class RewardTransform(Protocol):
    """``(code, result, reward) -> reward``: one stage of reward shaping."""

    def __call__(self, code: str, result: ExecResult, reward: float) -> float: ...


#: OpenEnv's list, kept textual on purpose: ``print("open(")`` matches too. A reward
#: heuristic, not a security boundary (the sandbox is that).
DANGEROUS_PATTERNS: tuple[str, ...] = (
    r"import\s+os",
    r"import\s+subprocess",
    r"eval\(",
    r"exec\(",
    r"__import__",
    r"open\(",
)


class SafetyPenalty:
    """Add ``penalty`` when the code matches any of ``patterns`` (regular expressions).

    Args:
        penalty: Added once, however many patterns match (default -1.0).
        patterns: Regular expressions searched in the code (default :data:`DANGEROUS_PATTERNS`).
    """

    def __init__(self, penalty: float = -1.0,
                 patterns: Sequence[str] = DANGEROUS_PATTERNS) -> None:
        self.penalty = float(penalty)
        self.patterns = tuple(re.compile(p) for p in patterns)

    def violation(self, code: str) -> str | None:
        """The first pattern the code matches, or None."""
        for pattern in self.patterns:
            if pattern.search(code):
                return pattern.pattern
        return None

    def __call__(self, code: str, result: ExecResult, reward: float) -> float:
        return reward + self.penalty if self.violation(code) is not None else reward

    def __repr__(self) -> str:
        return f"SafetyPenalty(penalty={self.penalty})"


class ConcisenessBonus:
    """Add ``bonus`` when the code, stripped of surrounding whitespace, is at most
    ``max_chars`` characters long."""

    def __init__(self, bonus: float = 0.1, max_chars: int = 100) -> None:
        self.bonus = float(bonus)
        self.max_chars = max_chars

    def __call__(self, code: str, result: ExecResult, reward: float) -> float:
        return reward + self.bonus if len(code.strip()) <= self.max_chars else reward

    def __repr__(self) -> str:
        return f"ConcisenessBonus(bonus={self.bonus}, max_chars={self.max_chars})"


class SyntaxPenalty:
    """Add ``penalty`` when the code does not parse as Python."""

    def __init__(self, penalty: float = -0.2) -> None:
        self.penalty = float(penalty)

    def __call__(self, code: str, result: ExecResult, reward: float) -> float:
        try:
            ast.parse(code)
        except (SyntaxError, ValueError):  # ValueError: NUL bytes on Python < 3.12
            return reward + self.penalty
        return reward

    def __repr__(self) -> str:
        return f"SyntaxPenalty(penalty={self.penalty})"


class Compose:
    """Apply transforms in order, each to the reward the previous one returned."""

    def __init__(self, transforms: Sequence[RewardTransform]) -> None:
        for transform in transforms:
            if not callable(transform):
                raise TypeError(
                    f"Expected each reward transform to be a callable "
                    f"(code, result, reward) -> reward, got {transform!r}"
                )
        self.transforms = tuple(transforms)

    def __call__(self, code: str, result: ExecResult, reward: float) -> float:
        for transform in self.transforms:
            reward = float(transform(code, result, reward))
        return reward

    def __repr__(self) -> str:
        return f"Compose({list(self.transforms)!r})"


def openenv() -> Compose:
    """The reward shaping of OpenEnv's coding_env, term for term.

    Starting from 0.0: ``print(1)`` earns 0.1, ``import os`` -0.9 (penalty plus the
    conciseness bonus), an unparsable short line -0.1.
    """
    return Compose([SafetyPenalty(), ConcisenessBonus(), SyntaxPenalty()])


#: Names accepted by ``CodingEnv(reward_transforms=...)``.
PRESETS: dict[str, Callable[[], Compose]] = {"openenv": openenv}


def resolve(spec: str | RewardTransform | Sequence[RewardTransform] | None) -> Compose:
    """A :class:`Compose` from a preset name, one transform, a sequence of them, or None."""
    if spec is None:
        return Compose([])
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ValueError(
                f"Unknown reward_transforms preset {spec!r}; expected one of {sorted(PRESETS)}, "
                "a list of callables (code, result, reward) -> reward, or None"
            )
        return PRESETS[spec]()
    if isinstance(spec, Compose):
        return spec
    if callable(spec):
        return Compose([spec])
    return Compose(list(spec))


__all__ = [
    "DANGEROUS_PATTERNS",
    "PRESETS",
    "Compose",
    "ConcisenessBonus",
    "RewardTransform",
    "SafetyPenalty",
    "SyntaxPenalty",
    "openenv",
    "resolve",
]
