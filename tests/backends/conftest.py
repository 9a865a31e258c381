"""Fixtures of the backend tests."""

from __future__ import annotations

import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.models import Limits


@pytest.fixture(params=["zygote", "spawn"])
def backend(request):
    b = LocalBackend(Limits(timeout_s=2.0, memory_mb=512, max_output_bytes=1 << 20),
                     start_method=request.param)
    b.reset()
    yield b
    b.close()
