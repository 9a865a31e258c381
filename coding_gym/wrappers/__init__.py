"""Adapters for RL libraries that need numeric spaces.

``SnippetActions`` turns the text action into ``Discrete(K)`` (a choice among K programs) and
``CodeFeatures`` turns the text observation into a ``Box`` of float32 features:

    >>> import gymnasium as gym, coding_gym
    >>> from coding_gym.wrappers import CodeFeatures, SnippetActions
    >>> env = CodeFeatures(SnippetActions(gym.make("CodingEnv-v0", tasks="builtin"),
    ...                                   ["def f(): pass", "print(1)"]))
    >>> env.action_space, env.observation_space.shape
    (Discrete(2), (1025,))
    >>> env.close()
"""

from __future__ import annotations

from coding_gym.wrappers.features import CodeFeatures
from coding_gym.wrappers.snippets import SnippetActions

__all__ = ["CodeFeatures", "SnippetActions"]
