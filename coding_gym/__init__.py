"""coding_gym: a Gymnasium environment whose actions are Python programs.

``import coding_gym`` registers ``CodingEnv-v0`` with Gymnasium and starts no process:

    >>> import gymnasium as gym, coding_gym
    >>> env = gym.make("CodingEnv-v0")

Without the import, ``gym.make("coding_gym:CodingEnv-v0")`` imports the package first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gymnasium.envs.registration import register, registry

from coding_gym.models import ExecResult, Limits

__version__ = "0.1.0"

if "CodingEnv-v0" not in registry:
    register(id="CodingEnv-v0", entry_point="coding_gym.env:CodingEnv",
             vector_entry_point="coding_gym.vector:CodingVectorEnv")

if TYPE_CHECKING:
    from coding_gym.backends.local import LocalBackend
    from coding_gym.env import CodingEnv
    from coding_gym.env_snapshot import EnvSnapshot
    from coding_gym.spaces import AnyText
    from coding_gym.vector import CodingVectorEnv

_LAZY = {
    "CodingEnv": "coding_gym.env",
    "CodingVectorEnv": "coding_gym.vector",
    "EnvSnapshot": "coding_gym.env_snapshot",
    "LocalBackend": "coding_gym.backends.local",
    "AnyText": "coding_gym.spaces",
}


def __getattr__(name: str) -> Any:
    # Heavier modules load on first use, so importing the package stays cheap.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'coding_gym' has no attribute {name!r}")


__all__ = ["AnyText", "CodingEnv", "CodingVectorEnv", "EnvSnapshot", "ExecResult", "Limits",
           "LocalBackend", "__version__"]
