"""Fixtures for tests marked ``docker``: the engine, the project image, the leak check.

Without an engine, docker tests skip with a message saying how to get one; with ``CI=true``
or ``CODING_GYM_REQUIRE_DOCKER=1`` they fail instead, so CI cannot pass without them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from coding_gym.containers import OWNER_PID_LABEL

ROOT = Path(__file__).resolve().parent.parent
SETUP_HINT = "scripts/docker-engine.sh && scripts/build-image.sh"


def docker_required() -> bool:
    """Whether docker tests must run (CI, or asked for explicitly) rather than skip."""
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return ci or os.environ.get("CODING_GYM_REQUIRE_DOCKER", "") == "1"


def _unavailable(reason: str) -> None:
    if docker_required():
        pytest.fail(f"Docker tests are required here but {reason}; set it up with: {SETUP_HINT}",
                    pytrace=False)
    pytest.skip(f"{reason}; to run the Docker tests: {SETUP_HINT}")


@pytest.fixture(scope="session")
def docker_client():
    """A Docker SDK client to a live engine; after the session, no test container may remain."""
    try:
        import docker
    except ImportError:
        _unavailable("the Docker SDK is not installed (pip install -e '.[docker]')")
    try:
        client = docker.from_env(timeout=30)
        client.ping()
    except Exception as e:
        _unavailable(f"no Docker engine answers ({e})")
    yield client
    leaked = client.containers.list(all=True, filters={"label": f"{OWNER_PID_LABEL}={os.getpid()}"})
    for container in leaked:
        container.remove(force=True)
    assert not leaked, f"containers left behind by the tests: {[c.name for c in leaked]}"


@pytest.fixture(scope="session")
def server_image(docker_client) -> str:
    """The project image, built by scripts/build-image.sh (kept when it is up to date)."""
    result = subprocess.run(["bash", "scripts/build-image.sh"], cwd=ROOT, capture_output=True,
                            text=True, timeout=1200, env={**os.environ, "PYTHON": sys.executable})
    if result.returncode != 0:
        _unavailable(f"scripts/build-image.sh failed:\n{result.stderr[-4000:]}\n")
    return result.stdout.strip().splitlines()[-1].removeprefix("IMAGE=")


@pytest.fixture(autouse=True)
def _docker_marker(request):
    """Tests marked ``docker`` get an engine, or skip (or fail where Docker is required)."""
    if request.node.get_closest_marker("docker") is not None:
        request.getfixturevalue("docker_client")
