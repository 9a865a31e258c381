"""Fixtures of the sandbox tests."""

from __future__ import annotations

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits


@pytest.fixture
def backends():
    """Three started backends with a 1 s time limit, closed afterwards."""
    started = [LocalBackend(Limits(timeout_s=1.0)) for _ in range(3)]
    for backend in started:
        backend.reset()
    yield started
    for backend in started:
        backend.close()
