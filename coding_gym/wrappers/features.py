"""``CodeFeatures``: a text observation as a fixed-size vector of float32 features."""

from __future__ import annotations

import math
import re
import zlib
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

#: Identifiers and numbers are tokens, and so is every other non-space character.
_TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+|\S")
#: Characters of each text that are read: enough to tell outputs apart, cheap on huge ones.
MAX_TEXT_CHARS = 65_536
_TEXT_FIELDS = ("prompt", "stdout", "stderr")


class CodeFeatures(gym.ObservationWrapper[np.ndarray, Any, Any]):
    """Encode a ``CodingEnv`` observation as a ``Box`` of float32 features.

    The vector is, in order (``self.feature_slices`` gives each part's slice):

    - ``exit_code``: one-hot of the exit code (256 values).
    - ``prompt`` (only when the observation has a prompt), ``stdout``, ``stderr``: a hashed
      bag of tokens of the text, ``buckets`` values each, scaled to unit length (all zeros
      for empty text). Tokens are lower-cased identifiers, numbers and single symbols of the
      first 65,536 characters; the bucket is CRC-32 of the token modulo ``buckets``, which
      unlike ``hash()`` is the same in every process and on every machine.
    - ``step``: ``log(1 + steps taken in the episode)``.

    Args:
        env: An env with a ``CodingEnv`` observation (a Dict with ``stdout``, ``stderr``,
            ``exit_code`` and maybe ``prompt``).
        buckets: Size of each hashed bag (default 256).
    """

    def __init__(self, env: gym.Env[Any, Any], buckets: int = 256) -> None:
        super().__init__(env)
        space = env.observation_space
        if not isinstance(space, spaces.Dict) or not {"stdout", "stderr", "exit_code"} <= set(
            space.spaces
        ):
            raise ValueError(
                "CodeFeatures expects a CodingEnv observation space (a Dict with 'stdout', "
                f"'stderr' and 'exit_code'), got {space}"
            )
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        self.buckets = buckets
        self.text_fields = tuple(f for f in _TEXT_FIELDS if f in space.spaces)
        sizes = [("exit_code", 256)] + [(f, buckets) for f in self.text_fields] + [("step", 1)]
        self.feature_slices: dict[str, slice] = {}
        start = 0
        for name, size in sizes:
            self.feature_slices[name] = slice(start, start + size)
            start += size
        self.size = start
        high = np.ones(start, dtype=np.float32)
        high[self.feature_slices["step"]] = np.inf
        self.observation_space = spaces.Box(0.0, high, dtype=np.float32)
        self._steps = 0

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        self._steps = 0
        return super().reset(seed=seed, options=options)

    def step(self, action: Any) -> tuple[np.ndarray, Any, bool, bool, dict[str, Any]]:
        self._steps += 1
        return super().step(action)

    def observation(self, observation: dict[str, Any]) -> np.ndarray:
        features = np.zeros(self.size, dtype=np.float32)
        features[self.feature_slices["exit_code"].start + int(observation["exit_code"])] = 1.0
        for field in self.text_fields:
            features[self.feature_slices[field]] = self.bag(str(observation[field]))
        features[self.feature_slices["step"]] = math.log1p(self._steps)
        return features

    def bag(self, text: str) -> np.ndarray:
        """The hashed, unit-length bag of tokens of ``text``."""
        counts = np.zeros(self.buckets, dtype=np.float32)
        for token in _TOKEN.findall(text[:MAX_TEXT_CHARS]):
            counts[zlib.crc32(token.lower().encode("utf-8", "replace")) % self.buckets] += 1.0
        norm = float(np.linalg.norm(counts))
        return counts / norm if norm else counts
