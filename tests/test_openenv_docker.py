"""``coding_gym.openenv.CodingEnv.from_docker_image`` against a real engine."""

from __future__ import annotations

import os

import pytest

from coding_gym.containers import OWNER_PID_LABEL
from coding_gym.errors import ContainerStartError
from coding_gym.openenv import CodeAction, CodingEnv

pytestmark = pytest.mark.docker


def own_container_ids(docker_client) -> set[str]:
    return {c.id for c in docker_client.containers.list(
        all=True, filters={"label": f"{OWNER_PID_LABEL}={os.getpid()}"})}


def test_round_trip_then_close_removes_the_container(server_image, docker_client):
    before = own_container_ids(docker_client)
    env = CodingEnv.from_docker_image(server_image)
    started = own_container_ids(docker_client) - before
    assert len(started) == 1
    try:
        result = env.reset(episode_id="docker-1")
        assert result.observation.stdout == "" and result.done is False
        env.step(CodeAction(code="answer = 6 * 7"))
        result = env.step(CodeAction(code="print(answer)"))
        assert result.observation.stdout == "42\n" and result.observation.exit_code == 0
        state = env.state()
        assert state.episode_id == "docker-1" and state.step_count == 2
    finally:
        env.close()
    env.close()
    assert not own_container_ids(docker_client) & started


def test_context_manager_removes_the_container(server_image, docker_client):
    before = own_container_ids(docker_client)
    with CodingEnv.from_docker_image(server_image) as env:
        assert env.step(CodeAction(code="print('hi')")).observation.stdout == "hi\n"
    assert own_container_ids(docker_client) == before


def test_start_failure_raises_container_start_error(docker_client):
    with pytest.raises(ContainerStartError, match="docker build -t"):
        CodingEnv.from_docker_image("coding-gym-test-no-such-image:latest")
