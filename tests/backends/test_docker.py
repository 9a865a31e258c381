"""DockerBackend against a real engine: the env contract, sharing, deaths, limits, leaks."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import gymnasium as gym
import httpx
import pytest
from gymnasium.utils.env_checker import check_env

import coding_gym  # noqa: F401 - registers CodingEnv-v0
from coding_gym.backends.docker import DockerBackend
from coding_gym.containers import OWNER_PID_LABEL, SERVER_CAPABILITIES
from coding_gym.errors import BackendError
from tests.docker_support import ROOT

pytestmark = pytest.mark.docker


def own_containers(docker_client) -> list:
    """Containers this test process owns, by label."""
    return docker_client.containers.list(
        all=True, filters={"label": f"{OWNER_PID_LABEL}={os.getpid()}"}
    )


@pytest.fixture(scope="module")
def env(server_image):
    e = gym.make("CodingEnv-v0", backend="docker", image=server_image, timeout_s=3.0,
                 max_output_bytes=4096)
    yield e
    e.close()


def test_check_env_passes_with_warnings_as_errors(env):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)


def test_variables_persist_and_reset_forgets_them(env):
    obs, info = env.reset(seed=1)
    assert obs == {"stdout": "", "stderr": "", "exit_code": 0} and info["step"] == 0
    env.step("total = 40")
    obs, reward, terminated, truncated, info = env.step("total += 2\nprint(total)")
    assert obs == {"stdout": "42\n", "stderr": "", "exit_code": 0}
    assert (reward, terminated, truncated, info["infra_error"]) == (0.0, False, False, None)
    env.reset()
    obs, *_ = env.step("print(total)")
    assert obs["exit_code"] == 1 and "NameError" in obs["stderr"]


def test_server_in_the_container_applies_the_env_limits(env):
    env.reset()
    obs, _, _, truncated, info = env.step("while True:\n    pass")
    assert info["kill_reason"] == "timeout" and not truncated
    obs, _, _, _, info = env.step("print('x' * 10_000)")
    assert info["stdout_truncated"] and obs["stdout"].startswith("x" * 4096)
    assert env.observation_space.contains(obs)
    obs, *_ = env.step("import os\nprint(os.getuid())")
    assert obs["stdout"] != "0\n", "the server must not run as root in the container"


def test_container_publishes_on_loopback_only_and_requires_the_token(env, docker_client):
    backend = env.unwrapped.backend
    container = docker_client.containers.get(backend.container.id)
    bindings = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"]
    assert {b["HostIp"] for b in bindings} == {"127.0.0.1"}
    url = backend.container.base_url
    assert httpx.get(f"{url}/sessions").status_code == 401
    wrong = {"Authorization": "Bearer not-the-token"}
    assert httpx.get(f"{url}/sessions", headers=wrong).status_code == 401
    right = {"Authorization": f"Bearer {backend.container.token}"}
    assert httpx.get(f"{url}/sessions", headers=right).status_code == 200


def test_container_has_memory_and_process_limits(server_image, docker_client):
    with DockerBackend(image=server_image, container_memory_mb=768,
                       container_max_processes=200, shared=False) as backend:
        host_config = docker_client.containers.get(backend.container.id).attrs["HostConfig"]
        assert host_config["Memory"] == 768 * 1024 * 1024
        assert host_config["PidsLimit"] == 200
        assert host_config["CapDrop"] == ["ALL"]
        assert sorted(host_config["CapAdd"]) == sorted(SERVER_CAPABILITIES)
        assert host_config["ReadonlyRootfs"] is True
        backend.reset()
        result = backend.run("open('notes.txt', 'w').write('kept')\n"
                             "print(open('notes.txt').read())\n"
                             "import sys\n"
                             "open(sys.prefix + '/planted.py', 'w')")
        assert result.stdout == "kept\n" and "Read-only file system" in result.stderr


def test_make_vec_shares_one_container(server_image, docker_client):
    before = {c.id for c in own_containers(docker_client)}
    envs = gym.make_vec("CodingEnv-v0", num_envs=3, backend="docker", image=server_image)
    try:
        started = {c.id for c in own_containers(docker_client)} - before
        assert len(started) == 1
        envs.reset(seed=0)
        envs.step(["x = 'a'", "x = 'b'", "x = 'c'"])
        observations, *_ = envs.step(["print(x)"] * 3)
        assert list(observations["stdout"]) == ["a\n", "b\n", "c\n"]
    finally:
        envs.close()
    assert not {c.id for c in own_containers(docker_client)} & started


def test_sessions_sharing_a_container_cannot_touch_each_other(server_image):
    """Each episode has a uid of its own in the container: one cannot kill the other's
    worker nor read its memory, even where the container allows no namespaces."""
    envs = gym.make_vec("CodingEnv-v0", num_envs=2, backend="docker", image=server_image,
                        timeout_s=5.0)
    try:
        envs.reset(seed=0)
        observations, *_ = envs.step(["import os\nprint(os.getpid(), os.getuid())"] * 2)
        (pid_a, uid_a), (_, uid_b) = (map(int, out.split()) for out in observations["stdout"])
        assert uid_a != uid_b and 0 not in (uid_a, uid_b)
        attack = ("import os, signal\n"
                  f"for action in (lambda: os.kill({pid_a}, signal.SIGKILL),\n"
                  f"               lambda: open('/proc/{pid_a}/mem', 'rb').read(1),\n"
                  f"               lambda: open('/proc/{pid_a}/environ', 'rb').read()):\n"
                  "    try:\n"
                  "        action()\n"
                  "        print('allowed')\n"
                  "    except OSError as e:\n"
                  "        print(type(e).__name__)")
        observations, *_ = envs.step(["x = 'intact'", attack])
        assert observations["stdout"][1].split() == ["PermissionError"] * 3
        observations, *_ = envs.step(["print(x)", "pass"])
        assert observations["stdout"][0] == "intact\n"
    finally:
        envs.close()


def test_container_killed_mid_episode_truncates_and_reset_starts_another(
    server_image, docker_client
):
    env = gym.make("CodingEnv-v0", backend="docker", image=server_image, shared=False)
    try:
        env.reset()
        env.step("kept = 1")
        first = env.unwrapped.backend.container
        docker_client.containers.get(first.id).kill()
        obs, reward, terminated, truncated, info = env.step("print(kept)")
        assert truncated and not terminated and reward == 0.0
        assert "stopped" in info["infra_error"] and "next reset" in info["infra_error"]
        assert first.status() == "removed"

        env.reset()
        second = env.unwrapped.backend.container
        assert second.id != first.id
        obs, _, _, truncated, info = env.step("print('alive')")
        assert obs["stdout"] == "alive\n" and not truncated and info["infra_error"] is None
    finally:
        env.close()


def test_step_after_death_without_reset_runs_in_a_new_container(server_image, docker_client):
    with DockerBackend(image=server_image, shared=False) as backend:
        backend.reset()
        backend.run("kept = 1")
        docker_client.containers.get(backend.container.id).kill()
        with pytest.raises(BackendError, match="stopped"):
            backend.run("print(kept)")
        result = backend.run("print('fresh')")
        assert result.stdout == "fresh\n" and result.state_lost


def test_close_removes_the_container_and_is_idempotent(server_image, docker_client):
    backend = DockerBackend(image=server_image, shared=False)
    container_id = backend.container.id
    backend.close()
    backend.close()
    assert container_id not in {c.id for c in docker_client.containers.list(all=True)}
    with pytest.raises(BackendError, match="closed"):
        backend.reset()


def test_backends_nobody_closed_are_removed_at_interpreter_exit(server_image, docker_client):
    program = (
        "import gymnasium as gym, coding_gym\n"
        f"env = gym.make('CodingEnv-v0', backend='docker', image={server_image!r})\n"
        "env.reset()\n"
        "print(env.unwrapped.backend.container.id, flush=True)\n"
    )
    result = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    container_id = result.stdout.split()[-1]
    assert container_id not in {c.id for c in docker_client.containers.list(all=True)}


def test_example_usage_runs_against_the_image(server_image):
    result = subprocess.run(
        [sys.executable, "examples/example_usage.py", "--backend", "docker",
         "--image", server_image],
        cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    assert "on the docker backend" in result.stdout
    assert "'Hello, World!\\n'" in result.stdout and "5 + 10 = 15" in result.stdout
    assert "ValueError: math domain error" in result.stdout
