"""Shared fixtures: process accounting for leak checks; Docker engine and image."""

from __future__ import annotations

import time

import pytest

from tests.docker_support import _docker_marker, docker_client, server_image  # noqa: F401
from tests.helpers import descendant_pids


@pytest.fixture
def no_leaked_processes():
    """Fail the test if it leaves any new descendant process behind."""
    before = descendant_pids()
    yield
    deadline = time.monotonic() + 5
    while True:
        leaked = descendant_pids() - before
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"processes left behind: {sorted(leaked)}"
