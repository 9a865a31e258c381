"""RemoteBackend: the gymnasium env over a real server, failures, tokens, plain OpenEnv servers."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env
from websockets.sync.server import ServerConnection

import coding_gym  # noqa: F401  (registers CodingEnv-v0)
from coding_gym.backends.remote import RemoteBackend, websocket_url
from coding_gym.errors import BackendError, ServerError
from coding_gym.models import Limits
from coding_gym.server import create_app
from coding_gym.server.serving import BackgroundServer, bind
from tests.servers import running_server, sessions_of, wait_for, websockets_server


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


@pytest.fixture
def env(server):
    env = gym.make("CodingEnv-v0", backend="remote", base_url=server.url, timeout_s=2.0)
    yield env
    env.close()


def test_variables_persist_and_info_matches_the_local_env(env):
    env.reset(seed=0)
    env.step("import math\nr = 2")
    observation, reward, terminated, truncated, info = env.step("print(round(math.pi * r, 3))")
    assert observation == {"stdout": "6.283\n", "stderr": "", "exit_code": 0}
    assert (reward, terminated, truncated) == (0.0, False, False)
    with gym.make("CodingEnv-v0") as local:
        local.reset(seed=0)
        local_info = local.step("print(1)")[4]
    assert set(info) == set(local_info)
    assert info["infra_error"] is None and info["step"] == 2
    assert info["wall_time_s"] >= 0 and info["kill_reason"] is None


def test_timeouts_and_exit_codes_come_through(env):
    env.reset()
    observation, _, _, _, info = env.step("import time\ntime.sleep(30)")
    assert info["kill_reason"] == "timeout"
    observation, _, _, _, info = env.step("raise SystemExit(4)")
    assert observation["exit_code"] == 4


def test_reset_gives_a_fresh_interpreter(env):
    env.reset()
    env.step("x = 1")
    env.reset()
    observation = env.step("print(x)")[0]
    assert "NameError" in observation["stderr"]


def test_check_env_passes_with_warnings_as_errors(server):
    env = gym.make("CodingEnv-v0", backend="remote", base_url=server.url)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env.unwrapped, skip_render_check=True)
    finally:
        env.close()


def test_unreachable_server_is_a_clear_backend_error():
    with bind("127.0.0.1", 0) as sock:
        port = sock.getsockname()[1]  # bound but never listening: connections are refused
    env = gym.make("CodingEnv-v0", backend="remote", base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(BackendError, match="could not connect .*coding-gym serve"):
        env.reset()
    env.close()


def test_server_dying_mid_step_truncates_with_infra_error():
    server = BackgroundServer(create_app(limits=Limits(timeout_s=30))).start()
    env = gym.make("CodingEnv-v0", backend="remote", base_url=server.url, timeout_s=30)
    try:
        env.reset()
        env.step("x = 1")

        def stop_once_the_step_runs():
            wait_for(lambda: any(s.busy for s in sessions_of(server).sessions()))
            server.stop()

        stopper = threading.Thread(target=stop_once_the_step_runs)
        stopper.start()
        observation, reward, terminated, truncated, info = env.step("import time\ntime.sleep(25)")
        stopper.join()
        assert truncated and not terminated and reward == 0.0
        assert "closed the connection" in info["infra_error"]
        assert "backend error" in observation["stderr"]
        # The server stays gone: the next step cannot reconnect, and says so.
        truncated, info = env.step("print(1)")[3:]
        assert truncated and "could not connect" in info["infra_error"]
    finally:
        env.close()
        server.stop()


def test_run_after_the_server_ended_the_session_reconnects_and_reports_lost_state():
    with running_server(idle_timeout_s=0.3) as server, \
            RemoteBackend(base_url=server.url) as backend:
        backend.reset()
        backend.run("x = 1")
        wait_for(lambda: sessions_of(server).active == 0)
        wait_for(lambda: not backend.connected)
        result = backend.run("print('again')")
        assert result.stdout == "again\n" and result.state_lost
        assert not backend.run("print(1)").state_lost


def test_capacity_reached_is_a_server_error():
    with running_server(max_sessions=1) as server, \
            RemoteBackend(base_url=server.url) as first, \
            RemoteBackend(base_url=server.url) as second:
        first.reset()
        with pytest.raises(ServerError, match="at capacity") as error:
            second.reset()
        assert error.value.code == "CAPACITY_REACHED"
        first.close()
        wait_for(lambda: sessions_of(server).active == 0)
        second.reset()
        assert second.run("print(2)").stdout == "2\n"


def test_token_is_sent_as_bearer_and_read_from_the_environment(monkeypatch):
    with running_server(token="t0k") as server:
        with RemoteBackend(base_url=server.url) as backend, \
                pytest.raises(BackendError, match="requires a token"):
            backend.reset()
        with RemoteBackend(base_url=server.url, token="bad") as backend, \
                pytest.raises(BackendError, match="rejected the token"):
            backend.reset()
        with RemoteBackend(base_url=server.url, token="t0k") as backend:
            backend.reset()
            assert backend.run("print('ok')").stdout == "ok\n"
        monkeypatch.setenv("CODING_GYM_TOKEN", "t0k")
        with RemoteBackend(base_url=server.url) as backend:
            backend.reset()
            assert backend.run("print('env')").stdout == "env\n"


def test_close_ends_the_server_session_and_is_safe_twice(server):
    backend = RemoteBackend(base_url=server.url)
    backend.reset()
    backend.run("x = 1")
    wait_for(lambda: sessions_of(server).active >= 1)
    backend.close()
    backend.close()
    wait_for(lambda: sessions_of(server).active == 0)
    with pytest.raises(BackendError, match="closed"):
        backend.run("print(1)")


@pytest.mark.parametrize(("given", "expected"), [
    ("http://127.0.0.1:8000", "ws://127.0.0.1:8000/ws"),
    ("https://example.org/env/", "wss://example.org/env/ws"),
    ("ws://h:1/ws", "ws://h:1/ws"),
    ("localhost:9000", "ws://localhost:9000/ws"),
])
def test_websocket_url(given, expected):
    assert websocket_url(given) == expected


def test_bad_base_url_is_refused_with_an_example():
    with pytest.raises(ValueError, match="http://127.0.0.1:8000"):
        RemoteBackend(base_url="ftp://x")


def test_against_a_plain_openenv_server_info_gets_defaults():
    from openenv.core.env_server.http_server import create_fastapi_app
    from openenv.core.env_server.interfaces import Environment
    from openenv.core.env_server.types import Action, Observation, State

    from coding_gym.backends.local import LocalBackend

    class PlainAction(Action):
        code: str

    class PlainObservation(Observation):
        stdout: str = ""
        stderr: str = ""
        exit_code: int = 0

    class PlainCodingEnvironment(Environment):
        """A minimal OpenEnv coding environment: no extras beside the observation."""

        SUPPORTS_CONCURRENT_SESSIONS = True

        def __init__(self):
            super().__init__()
            self.backend = LocalBackend()
            self._state = State(episode_id="plain", step_count=0)

        def reset(self, seed=None, episode_id=None, **kwargs):
            self.backend.reset()
            return PlainObservation()

        def step(self, action, timeout_s=None, **kwargs):
            result = self.backend.run(action.code)
            self._state.step_count += 1
            code = -1 if result.exit_code == 1 else result.exit_code
            return PlainObservation(stdout=result.stdout, stderr=result.stderr, exit_code=code)

        @property
        def state(self):
            return self._state

        def close(self):
            self.backend.close()

    app = create_fastapi_app(PlainCodingEnvironment, PlainAction, PlainObservation,
                             max_concurrent_envs=2)
    with BackgroundServer(app) as server:
        env = gym.make("CodingEnv-v0", backend="remote", base_url=server.url)
        try:
            env.reset()
            env.step("y = 5")
            observation, _, _, truncated, info = env.step("print(y * 2)")
            assert observation == {"stdout": "10\n", "stderr": "", "exit_code": 0}
            assert not truncated
            assert info["kill_reason"] is None and info["state_lost"] is False
            assert info["stdout_truncated"] is False and info["cpu_time_s"] == 0.0
            failed = env.step("1 / 0")[0]
            assert failed["exit_code"] == 255 and "ZeroDivisionError" in failed["stderr"]
        finally:
            env.close()
        with RemoteBackend(base_url=server.url) as backend:
            backend.reset()
            result = backend.run("print('round trip')")
            assert result.stdout == "round trip\n"
            assert result.wall_time_s > 0  # measured by the client: the server sends none


def test_output_bigger_than_the_clients_own_limit_still_arrives():
    with running_server(limits=Limits(max_output_bytes=8 << 20)) as server, \
            RemoteBackend(Limits(max_output_bytes=1000), base_url=server.url) as backend:
        backend.reset()
        result = backend.run("import sys\nsys.stdout.write('\\x01' * 5_000_000)")
        assert len(result.stdout) == 5_000_000 and not result.stdout_truncated


@contextmanager
def answering(reply: str) -> Iterator[str]:
    """A WebSocket server that answers every message with ``reply``; its base URL."""

    def answer(ws: ServerConnection) -> None:
        for _ in ws:
            ws.send(reply)

    with websockets_server(answer) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.mark.parametrize(("reply", "words"), [
    ("<html>busy</html>", "sent a reply that is not JSON"),
    ('{"type": "observation", "data": {"observation": NaN} junk', "sent a reply that is not JSON"),
    ('{"type": "observation", "data": [1]}', "sent a reply without a data object"),
])
def test_a_reply_that_is_no_protocol_message_is_a_backend_error(reply, words):
    with answering(reply) as url, RemoteBackend(base_url=url) as backend:
        with pytest.raises(BackendError, match=words):
            backend.reset()
        assert not backend.connected
