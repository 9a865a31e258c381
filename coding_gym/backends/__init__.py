"""Execution backends: where an episode's code runs. The env sees only :class:`Backend`."""

from __future__ import annotations

import importlib
from typing import Any

from coding_gym.backends.base import Backend
from coding_gym.models import Limits

#: Backend names accepted by ``CodingEnv(backend=...)``, imported only when used.
BACKENDS = {
    "local": "coding_gym.backends.local:LocalBackend",
    "remote": "coding_gym.backends.remote:RemoteBackend",
    "docker": "coding_gym.backends.docker:DockerBackend",
}


def make_backend(backend: str | Backend, limits: Limits, **options: Any) -> Backend:
    """A backend instance from a name in :data:`BACKENDS`, or ``backend`` itself."""
    if not isinstance(backend, str):
        if options:
            raise TypeError(
                f"backend options {sorted(options)} only apply to a backend given by name, "
                f"not to the instance {backend!r}; configure the instance instead"
            )
        return backend
    if backend not in BACKENDS:
        raise ValueError(
            f"Unknown backend {backend!r}; expected one of {sorted(BACKENDS)} or a Backend instance"
        )
    module_name, class_name = BACKENDS[backend].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(limits=limits, **options)


__all__ = ["BACKENDS", "Backend", "make_backend"]
