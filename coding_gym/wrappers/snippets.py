"""``SnippetActions``: a ``Discrete(K)`` action picks one of K programs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class SnippetActions(gym.ActionWrapper[Any, np.int64, str]):
    """Replace the text action by the index of one of ``snippets``.

    For agents that choose among known programs (a contextual bandit over code, a curriculum
    of tools) and libraries whose policies output numbers. Action ``i`` runs
    ``snippets[i]``; ``self.snippets`` maps indices back to code.

    Args:
        env: An env whose actions are Python source, such as ``CodingEnv``.
        snippets: The programs, at least one; each a ``str``.
    """

    def __init__(self, env: gym.Env[Any, str], snippets: Sequence[str]) -> None:
        super().__init__(env)
        if isinstance(snippets, str) or not snippets:
            raise ValueError(
                f"Expected snippets to be a non-empty sequence of str, got {snippets!r:.80}"
            )
        for i, snippet in enumerate(snippets):
            if not isinstance(snippet, str):
                raise TypeError(
                    f"Expected every snippet to be a str of Python source, got "
                    f"{type(snippet).__name__} at index {i}"
                )
        self.snippets = tuple(snippets)
        self.action_space = spaces.Discrete(len(self.snippets))

    def action(self, action: Any) -> str:
        index = int(action)
        if not 0 <= index < len(self.snippets):
            raise ValueError(
                f"Expected an action in [0, {len(self.snippets)}), got {action!r}"
            )
        return self.snippets[index]
