"""The OpenEnv-style client, and OpenEnv's own published client driving our server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from coding_gym.errors import BackendError, ServerError
from coding_gym.openenv import CodeAction, CodeObservation, CodeState, CodingEnv, StepResult
from tests.servers import running_server, sessions_of, wait_for


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


def test_reset_step_state_like_openenv(server):
    with CodingEnv(base_url=server.url) as env:
        result = env.reset(episode_id="ep-7")
        assert isinstance(result, StepResult)
        assert result.observation == CodeObservation(stdout="", stderr="", exit_code=0)
        assert (result.reward, result.done) == (None, False)

        env.step(CodeAction(code="x = 6 * 7"))
        result = env.step(CodeAction(code="print(x)"))
        assert result.observation.stdout == "42\n" and result.observation.exit_code == 0
        assert (result.reward, result.done) == (0.0, False)
        assert result.info["step"] == 2 and result.info["kill_reason"] is None

        state = env.state()
        assert isinstance(state, CodeState)
        assert (state.episode_id, state.step_count, state.last_exit_code) == ("ep-7", 2, 0)


def test_step_timeout_and_errors(server):
    with CodingEnv(base_url=server.url) as env:
        env.reset()
        slow = env.step(CodeAction(code="import time\ntime.sleep(60)"), timeout_s=0.3)
        assert slow.info["kill_reason"] == "timeout"
        failed = env.step(CodeAction(code="raise KeyError('k')"))
        assert failed.observation.exit_code == 1 and "KeyError" in failed.observation.stderr
        with pytest.raises(TypeError, match=r"CodeAction\(code=...\)"):
            env.step("print(1)")  # type: ignore[arg-type]


def test_server_errors_carry_their_code(server):
    with CodingEnv(base_url=server.url) as env, pytest.raises(ServerError) as error:
        env.reset(seed=-1)
    assert error.value.code == "VALIDATION_ERROR"


def test_close_ends_the_session_not_the_server(server):
    env = CodingEnv(base_url=server.url)
    env.reset()
    env.close()
    env.close()
    wait_for(lambda: sessions_of(server).active == 0)
    assert httpx.get(f"{server.url}/health").json() == {"status": "healthy"}
    with CodingEnv(base_url=server.url) as again:
        assert again.step(CodeAction(code="print('up')")).observation.stdout == "up\n"


def test_unreachable_server():
    with pytest.raises(BackendError, match="could not connect"):
        CodingEnv(base_url="http://127.0.0.1:9").reset()


def test_code_action_refuses_unknown_fields():
    with pytest.raises(ValueError, match="extra"):
        CodeAction(code="1", language="py")  # type: ignore[call-arg]


# OpenEnv's published client (openenv-core, the `interop` extra), written by others.


def test_openenv_generic_client_sync(server):
    from openenv.core.generic_client import GenericEnvClient

    with GenericEnvClient(base_url=server.url).sync() as env:
        reset = env.reset()
        assert reset.observation == {"stdout": "", "stderr": "", "exit_code": 0}
        assert reset.done is False
        env.step({"code": "items = [1, 2, 3]"})
        result = env.step({"code": "items.append(4)\nprint(sum(items))"})
        assert result.observation == {"stdout": "10\n", "stderr": "", "exit_code": 0}
        assert result.reward == 0.0 and result.done is False
        state = env.state()
        assert state["step_count"] == 2 and state["last_exit_code"] == 0
        assert isinstance(state["episode_id"], str)


def test_openenv_generic_client_async_with_typed_observation(server):
    from openenv.core.env_server.types import CodeExecResult
    from openenv.core.generic_client import GenericEnvClient

    async def episode() -> list[CodeExecResult]:
        async with GenericEnvClient(base_url=server.url) as env:
            await env.reset(seed=3)
            first = await env.step({"code": "import sys\nprint('to err', file=sys.stderr)"})
            second = await env.step({"code": "raise SystemExit(9)"})
        # OpenEnv's own strict model (extra keys forbidden) must accept our observations.
        return [CodeExecResult(**r.observation) for r in (first, second)]

    first, second = asyncio.run(episode())
    assert first.stderr == "to err\n" and first.exit_code == 0
    assert second.exit_code == 9


def test_openenv_client_sees_server_errors(server):
    from openenv.core.generic_client import GenericEnvClient

    with GenericEnvClient(base_url=server.url).sync() as env:
        env.reset()
        with pytest.raises(RuntimeError, match="VALIDATION_ERROR"):
            env.step({"source": "print(1)"})
        assert env.step({"code": "print('still fine')"}).observation["stdout"] == "still fine\n"
