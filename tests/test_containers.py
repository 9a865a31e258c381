"""Server containers against a real engine: sharing, start failures, orphans."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from coding_gym.containers import (
    OWNER_PID_LABEL,
    ContainerSpec,
    lease_container,
    remove_orphans,
)
from coding_gym.errors import ContainerStartError
from tests.docker_support import ROOT

pytestmark = pytest.mark.docker


def derived_image(docker_client, base: str, tag: str, entrypoint: str) -> str:
    """A one-line variant of the server image whose entrypoint is ``entrypoint``."""
    dockerfile = f"FROM {base}\nENTRYPOINT {entrypoint}\n"
    docker_client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
    return tag


@pytest.fixture(scope="module")
def exiting_image(docker_client, server_image):
    tag = derived_image(docker_client, server_image, "coding-gym-test-exits:latest",
                        '["python3", "-c", "print(\'port 8000 is mine, giving up\'); exit(3)"]')
    yield tag
    docker_client.images.remove(tag, force=True)


@pytest.fixture(scope="module")
def silent_image(docker_client, server_image):
    tag = derived_image(docker_client, server_image, "coding-gym-test-silent:latest",
                        '["python3", "-c", "import time; print(\'warming up\'); '
                        'time.sleep(600)"]')
    yield tag
    docker_client.images.remove(tag, force=True)


def all_ids(docker_client) -> set[str]:
    return {c.id for c in docker_client.containers.list(all=True)}


def test_equal_specs_share_a_container_until_the_last_release(server_image, docker_client):
    spec = ContainerSpec(server_image)
    first = lease_container(spec)
    second = lease_container(spec)
    try:
        assert second.container is first.container
    finally:
        first.release()
    assert first.container.status() == "running"
    second.release()
    second.release()
    assert first.container.id not in all_ids(docker_client)


def test_unshared_lease_gets_its_own_container(server_image, docker_client):
    spec = ContainerSpec(server_image)
    shared, own = lease_container(spec), lease_container(spec, shared=False)
    try:
        assert own.container is not shared.container
        assert own.container.token != shared.container.token
    finally:
        own.release()
        shared.release()
    assert not {shared.container.id, own.container.id} & all_ids(docker_client)


def test_a_container_that_exits_fails_with_its_logs(exiting_image, docker_client):
    before = all_ids(docker_client)
    with pytest.raises(ContainerStartError,
                       match=r"(?s)stopped before its server was ready.*exit code 3.*"
                             r"port 8000 is mine, giving up"):
        lease_container(ContainerSpec(exiting_image), startup_timeout_s=30)
    assert all_ids(docker_client) == before


def test_a_server_that_never_answers_times_out_with_its_logs(silent_image, docker_client):
    before = all_ids(docker_client)
    with pytest.raises(ContainerStartError,
                       match=r"(?s)did not answer .*/health within 1\.5 s.*warming up"):
        lease_container(ContainerSpec(silent_image), startup_timeout_s=1.5)
    assert all_ids(docker_client) == before


def test_missing_image_says_how_to_build_it(docker_client):
    with pytest.raises(ContainerStartError, match=r"not on this Docker engine.*docker build -t"):
        lease_container(ContainerSpec("coding-gym-test-no-such-image:latest"))


def test_spec_rejects_bad_limits():
    with pytest.raises(ValueError, match="memory_mb to be a positive int or None, got 0"):
        ContainerSpec("coding-env:latest", memory_mb=0)


def test_containers_of_a_killed_process_are_removed_by_the_next_one(
    server_image, docker_client
):
    # SIGKILL skips every exit handler: only the next process can clean up.
    program = (
        "import os, signal\n"
        "from coding_gym.containers import ContainerSpec, lease_container\n"
        f"lease = lease_container(ContainerSpec({server_image!r}), shared=False)\n"
        "print(lease.container.id, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == -9, result.stderr
    container_id = result.stdout.split()[-1]
    orphan = docker_client.containers.get(container_id)
    assert orphan.labels[OWNER_PID_LABEL] != ""
    assert orphan.name in remove_orphans()
    assert container_id not in all_ids(docker_client)
