"""The image built from the Dockerfile, run the way a user runs it (``docker run ...``)."""

from __future__ import annotations

import os
import time

import gymnasium as gym
import httpx
import pytest

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.containers import OWNER_PID_LABEL

pytestmark = pytest.mark.docker

TOKEN = "dockerfile-test-token"


def run_image(docker_client, image: str, *args: str, token: str | None = None):
    """``docker run -d -p 127.0.0.1::8000 [-e CODING_GYM_TOKEN=...] image args...``."""
    return docker_client.containers.run(
        image, list(args), detach=True,
        ports={"8000/tcp": ("127.0.0.1", None)},
        environment={"CODING_GYM_TOKEN": token} if token else {},
        # Owned by this process, so the session's leak check covers it.
        labels={OWNER_PID_LABEL: str(os.getpid())},
    )


def wait_for_health(container, timeout_s: float = 60.0) -> str:
    """The base URL of the container's server, once ``/health`` answers."""
    container.reload()
    port = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"][0]["HostPort"]
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        container.reload()
        assert container.status == "running", container.logs().decode()
        time.sleep(0.1)
    raise AssertionError(f"no /health within {timeout_s} s:\n{container.logs().decode()}")


@pytest.fixture(scope="module")
def served(docker_client, server_image):
    container = run_image(docker_client, server_image, token=TOKEN)
    try:
        yield container, wait_for_health(container)
    finally:
        container.remove(force=True)


def test_image_metadata(docker_client, server_image):
    config = docker_client.images.get(server_image).attrs["Config"]
    assert config["User"] == "coding-gym"
    assert set(config["ExposedPorts"]) == {"8000/tcp"}
    assert config["Entrypoint"][:6] == ["coding-gym", "serve", "--host", "0.0.0.0",
                                         "--port", "8000"]
    assert config["Healthcheck"]["Test"][:2] == ["CMD", "python3"]


def test_healthcheck_command_passes_in_a_running_container(served, docker_client,
                                                           server_image):
    container, _ = served
    test = docker_client.images.get(server_image).attrs["Config"]["Healthcheck"]["Test"]
    exit_code, output = container.exec_run(test[1:])
    assert exit_code == 0, output.decode()


def test_runs_as_a_non_root_user_without_build_leftovers(served):
    container, _ = served
    exit_code, output = container.exec_run(["id", "-u"])
    assert exit_code == 0 and output.decode().strip() != "0"
    exit_code, _ = container.exec_run(["sh", "-c", "test ! -e /tmp/deps && test ! -e /tmp/dist"])
    assert exit_code == 0, "wheels and build output must stay in the build stage"


def test_web_ui_is_open_and_code_routes_need_the_token(served):
    _, url = served
    page = httpx.get(f"{url}/web/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert httpx.get(f"{url}/sessions").status_code == 401
    ok = httpx.get(f"{url}/sessions", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200


def test_remote_env_against_a_running_container_leaves_it_running(served):
    container, url = served
    env = gym.make("CodingEnv-v0", backend="remote", base_url=url, token=TOKEN)
    try:
        env.reset()
        env.step("import sys")
        obs, *_ = env.step("print(sys.version_info[0])")
        assert obs == {"stdout": "3\n", "stderr": "", "exit_code": 0}
    finally:
        env.close()
    container.reload()
    assert container.status == "running"


def test_without_a_token_the_server_refuses_to_start(docker_client, server_image):
    container = run_image(docker_client, server_image)
    try:
        assert container.wait(timeout=60)["StatusCode"] != 0
        assert "--insecure" in container.logs().decode()
    finally:
        container.remove(force=True)


def test_insecure_serves_without_a_token(docker_client, server_image):
    container = run_image(docker_client, server_image, "--insecure")
    try:
        url = wait_for_health(container)
        assert httpx.get(f"{url}/sessions").status_code == 200
    finally:
        container.remove(force=True)
