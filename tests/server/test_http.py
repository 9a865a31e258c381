"""HTTP routes of the server: OpenEnv's contract, HTTP sessions, tokens and limits."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import httpx
import pytest

from coding_gym.models import Limits
from coding_gym.sandbox.processes import pid_alive
from coding_gym.server import app as app_module
from coding_gym.server.security import browser_refusal
from tests.servers import running_server, sessions_of, wait_for

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def test_health(http):
    response = http.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "healthy"}


def test_metadata_names_the_environment_and_its_limits(http):
    meta = http.get("/metadata").json()
    assert meta["name"] == "coding_gym"
    assert isinstance(meta["description"], str) and meta["description"]
    assert meta["version"] == __import__("coding_gym").__version__
    assert meta["limits"]["timeout_s"] == 5.0
    assert meta["token_required"] is False


def test_openapi_has_a_string_version(http):
    info = http.get("/openapi.json").json()["info"]
    assert isinstance(info["version"], str)


def test_schema_describes_action_observation_and_state(http):
    schema = http.get("/schema").json()
    assert set(schema) == {"action", "observation", "state"}
    assert schema["action"]["required"] == ["code"]
    assert schema["action"]["additionalProperties"] is False
    assert set(schema["observation"]["properties"]) == {"stdout", "stderr", "exit_code"}
    assert {"episode_id", "step_count", "last_exit_code"} <= set(schema["state"]["properties"])


@pytest.mark.parametrize("kwargs", [{}, {"json": {}}, {"json": {"seed": None, "extra": 1}}])
def test_reset_returns_an_empty_observation(http, kwargs):
    body = http.post("/reset", **kwargs).json()
    assert body["observation"] == {"stdout": "", "stderr": "", "exit_code": 0}
    assert body["reward"] is None and body["done"] is False
    assert body["info"]["step"] == 0


def test_reset_seed_repeats_the_episode_id_and_episode_id_is_kept(http):
    first = http.post("/reset", json={"seed": 7}).json()["info"]["episode_id"]
    again = http.post("/reset", json={"seed": 7}).json()["info"]["episode_id"]
    other = http.post("/reset", json={"seed": 8}).json()["info"]["episode_id"]
    assert first == again != other
    named = http.post("/reset", json={"episode_id": "ep-1"}).json()
    assert named["info"]["episode_id"] == "ep-1"


@pytest.mark.parametrize("body", [{"seed": -1}, {"seed": "x"}, {"seed": "3"}, {"seed": False},
                                  {"episode_id": "e" * 256}])
def test_reset_validates_its_body(http, body):
    response = http.post("/reset", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "body"


def test_step_observation_holds_exactly_three_keys_and_info_sits_beside_it(http):
    body = http.post("/step", json={"action": {"code": "print(6 * 7)"}}).json()
    assert body["observation"] == {"stdout": "42\n", "stderr": "", "exit_code": 0}
    assert body["reward"] == 0.0 and body["done"] is False
    assert {"wall_time_s", "cpu_time_s", "stdout_truncated", "stderr_truncated", "kill_reason",
            "state_lost", "episode_id", "step"} <= set(body["info"])
    assert body["info"]["step"] == 1


def test_stateless_steps_do_not_share_variables(http):
    http.post("/step", json={"action": {"code": "shared = 1"}})
    body = http.post("/step", json={"action": {"code": "print(shared)"}}).json()
    assert body["observation"]["exit_code"] == 1
    assert "NameError" in body["observation"]["stderr"]


def test_step_accepts_openenv_extras(http):
    body = {"action": {"code": "print('ok')", "metadata": {"tag": 1}},
            "request_id": "r-1", "render": True}
    assert http.post("/step", json=body).json()["observation"]["stdout"] == "ok\n"


@pytest.mark.parametrize(
    ("body", "loc"),
    [({"action": {}}, ["body", "action", "code"]),
     ({"action": {"code": "1", "lang": "py"}}, ["body", "action", "lang"]),
     ({"action": {"code": 5}}, ["body", "action", "code"]),
     ({}, ["body", "action"]),
     ({"action": {"code": "1"}, "timeout_s": 0}, ["body", "timeout_s"]),
     ({"action": {"code": "1"}, "timeout_s": True}, ["body", "timeout_s"]),
     ({"action": {"code": "1"}, "timeout_s": "2"}, ["body", "timeout_s"])],
)
def test_invalid_step_is_422_with_pydantic_detail(http, body, loc):
    response = http.post("/step", json=body)
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert detail[0]["loc"] == loc and isinstance(detail[0]["msg"], str)


def test_step_timeout_is_capped_by_the_server_limit():
    with running_server(limits=Limits(timeout_s=0.5)) as server:
        body = httpx.post(f"{server.url}/step", timeout=30, json={
            "action": {"code": "import time\ntime.sleep(60)"}, "timeout_s": 1000}).json()
    assert body["info"]["kill_reason"] == "timeout"


def test_step_timeout_shortens_the_step(http):
    body = http.post("/step", json={"action": {"code": "import time\ntime.sleep(60)"},
                                    "timeout_s": 0.3}).json()
    assert body["info"]["kill_reason"] == "timeout"
    assert "StepTimeout" in body["observation"]["stderr"]


def test_stateless_state_is_empty(http):
    assert http.get("/state").json() == {"episode_id": None, "step_count": 0,
                                         "last_exit_code": None}


def test_http_session_keeps_state_until_deleted(http, server):
    created = http.post("/sessions", json={"episode_id": "mine"})
    assert created.status_code == 201
    sid = created.json()["session_id"]
    assert created.json()["info"]["episode_id"] == "mine"
    headers = {"X-Session-Id": sid}
    http.post("/step", json={"action": {"code": "x = 20"}}, headers=headers)
    body = http.post("/step", json={"action": {"code": "print(x + 22)\nraise SystemExit(3)"}},
                     headers=headers).json()
    assert body["observation"] == {"stdout": "42\n", "stderr": "", "exit_code": 3}
    assert body["info"]["step"] == 2
    assert http.get("/state", headers=headers).json() == {
        "episode_id": "mine", "step_count": 2, "last_exit_code": 3}

    reset = http.post("/reset", json={"seed": 1}, headers=headers).json()
    assert reset["info"]["step"] == 0
    after = http.post("/step", json={"action": {"code": "print(x)"}}, headers=headers).json()
    assert "NameError" in after["observation"]["stderr"]

    pid = sessions_of(server).get(sid).backend.worker_pid
    assert http.delete(f"/sessions/{sid}").status_code == 204
    assert not pid_alive(pid)
    gone = http.get("/state", headers=headers)
    assert gone.status_code == 404
    assert "POST /sessions" in gone.json()["detail"]


def test_unknown_session_is_404_on_every_route(http):
    headers = {"X-Session-Id": "nope"}
    assert http.post("/reset", headers=headers).status_code == 404
    assert http.post("/step", json={"action": {"code": "1"}}, headers=headers).status_code == 404
    assert http.get("/state", headers=headers).status_code == 404
    assert http.delete("/sessions/nope").status_code == 404


def test_sessions_reports_capacity(http):
    body = http.get("/sessions").json()
    assert body["max_sessions"] == 64 and body["active"] >= 0
    assert body["idle_timeout_s"] == 600.0


def test_capacity_is_503_when_every_session_is_taken():
    with running_server(max_sessions=1) as server, httpx.Client(base_url=server.url) as http:
        sid = http.post("/sessions").json()["session_id"]
        full = http.post("/sessions")
        assert full.status_code == 503
        assert full.headers["retry-after"] == "1"
        assert "max-sessions" in full.json()["detail"]
        assert http.post("/step", json={"action": {"code": "1"}}).status_code == 503
        http.delete(f"/sessions/{sid}")
        assert http.post("/step", json={"action": {"code": "print(1)"}}).status_code == 200


def test_idle_http_session_is_reaped():
    with running_server(idle_timeout_s=0.3) as server, httpx.Client(base_url=server.url) as http:
        sid = http.post("/sessions").json()["session_id"]
        pid = sessions_of(server).get(sid).backend.worker_pid
        wait_for(lambda: sessions_of(server).active == 0)
        assert not pid_alive(pid)
        assert http.get("/state", headers={"X-Session-Id": sid}).status_code == 404


def test_body_over_the_limit_is_413_whether_declared_or_streamed():
    with running_server(max_message_bytes=1000) as server, \
            httpx.Client(base_url=server.url) as http:
        big = {"action": {"code": "#" * 2000}}
        declared = http.post("/step", json=big)
        assert declared.status_code == 413
        assert "1000 bytes" in declared.json()["detail"]

        def chunks():
            for _ in range(10):
                yield b" " * 500

        streamed = http.post("/step", content=chunks(),
                             headers={"content-type": "application/json"})
        assert streamed.status_code == 413
        assert http.post("/step", json={"action": {"code": "print(1)"}}).status_code == 200


def test_malformed_json_body_is_refused_and_server_survives(http):
    response = http.post("/step", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert response.status_code == 422
    deep = http.post("/step", content=b"[" * 100_000,
                     headers={"content-type": "application/json"})
    assert 400 <= deep.status_code < 500
    assert http.post("/step", json={"action": {"code": "print(1)"}}).status_code == 200


def test_mcp_answers_json_rpc(http):
    listed = http.post("/mcp", json={"jsonrpc": "2.0", "id": 7, "method": "tools/list"}).json()
    assert listed["jsonrpc"] == "2.0" and listed["id"] == 7
    assert listed["error"]["code"] == -32601 and "no MCP tools" in listed["error"]["message"]
    parse = http.post("/mcp", content=b"{").json()
    assert parse["error"]["code"] == -32700
    invalid = http.post("/mcp", json=[1, 2]).json()
    assert invalid["error"]["code"] == -32600


def test_root_redirects_to_the_web_ui(http):
    response = http.get("/", follow_redirects=True)
    assert response.status_code == 200
    assert str(response.url).endswith("/web/")
    assert 'id="code"' in response.text and 'id="run"' in response.text


def test_web_ui_files_are_served_with_browser_headers(http):
    for path, kind in (("/web/app.js", "javascript"), ("/web/style.css", "css")):
        response = http.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"]
    page = http.get("/web/")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["referrer-policy"] == "no-referrer"
    assert http.get("/web/missing.js").status_code == 404


def test_backend_failure_is_500_with_the_reason():
    # One megabyte of address space: no interpreter can start in it.
    with running_server(limits=Limits(memory_mb=1)) as server:
        response = httpx.post(f"{server.url}/step", timeout=60,
                              json={"action": {"code": "print(1)"}})
        assert response.status_code == 500
        assert "could not run the request" in response.json()["detail"]
        wait_for(lambda: sessions_of(server).active == 0)  # closed after the reply


def test_client_disconnecting_mid_step_kills_the_worker_and_frees_the_slot(server):
    manager = sessions_of(server)
    host, port = server.url.removeprefix("http://").split(":")
    body = b'{"action": {"code": "import time\\ntime.sleep(60)"}, "timeout_s": 5}'
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /step HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        session = wait_for(lambda: next((s for s in manager.sessions()
                                         if s.busy and s.backend.worker_pid), None))
        pid = session.backend.worker_pid
    wait_for(lambda: manager.get(session.id) is None)
    assert not pid_alive(pid)


@pytest.fixture(scope="module")
def token_http():
    with running_server(token=TOKEN) as server, httpx.Client(base_url=server.url) as client:
        yield client


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/reset", None), ("POST", "/step", {"action": {"code": "1"}}),
    ("GET", "/state", None), ("POST", "/sessions", None), ("GET", "/sessions", None),
    ("POST", "/mcp", {"jsonrpc": "2.0", "id": 1, "method": "x"}),
])
def test_routes_that_run_code_need_the_token(token_http, method, path, body):
    refused = token_http.request(method, path, json=body)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert "Authorization: Bearer" in refused.json()["detail"]
    wrong = token_http.request(method, path, json=body, headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401
    ok = token_http.request(method, path, json=body,
                            headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code in (200, 201)


def test_descriptive_routes_and_the_page_need_no_token(token_http):
    for path in ("/health", "/metadata", "/schema", "/openapi.json", "/web/"):
        assert token_http.get(path).status_code == 200
    assert token_http.get("/metadata").json()["token_required"] is True


@pytest.mark.parametrize("headers", [
    {"Host": "attacker.example"},  # DNS rebinding: another name resolving to 127.0.0.1
    {"Origin": "http://attacker.example"},  # another site's page
])
def test_without_a_token_only_loopback_hosts_and_own_pages_are_answered(http, headers):
    refused = http.post("/step", json={"action": {"code": "print(1)"}}, headers=headers)
    assert refused.status_code == 403
    assert "no token" in refused.json()["detail"]


def test_own_origin_and_localhost_are_answered(http, server):
    port = server.url.rsplit(":", 1)[1]
    headers = {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"}
    response = http.post("/step", json={"action": {"code": "print(1)"}}, headers=headers)
    assert response.status_code == 200


def test_any_host_lifts_the_host_rule_but_not_the_origin_rule():
    with running_server(any_host=True) as server, httpx.Client(base_url=server.url) as http:
        body = {"action": {"code": "print(1)"}}
        assert http.post("/step", json=body, headers={"Host": "box.lan:1"}).status_code == 200
        cross = http.post("/step", json=body, headers={"Origin": "http://attacker.example"})
        assert cross.status_code == 403


def test_token_server_answers_any_host(token_http):
    response = token_http.get("/state", headers={"Host": "box.lan",
                                                  "Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200


def test_deleting_a_session_mid_step_kills_its_interpreter(http, server):
    sid = http.post("/sessions").json()["session_id"]
    session = sessions_of(server).get(sid)
    pid = session.backend.worker_pid
    results = []
    stepper = threading.Thread(target=lambda: results.append(http.post(
        "/step", json={"action": {"code": "import time\ntime.sleep(60)"}},
        headers={"X-Session-Id": sid}).json()))
    stepper.start()
    wait_for(lambda: session.busy)
    assert http.delete(f"/sessions/{sid}").status_code == 204
    stepper.join(30)
    assert not pid_alive(pid)
    assert results[0]["info"]["state_lost"] is True
    assert results[0]["info"]["kill_reason"] == "signal"


def test_requests_are_admitted_on_the_event_loop(monkeypatch):
    # Checked in a thread of FastAPI's pool, as a plain function would be, every guarded
    # request paid two hand-offs between threads.
    on_loop: list[bool] = []

    def refusal(headers: Any, *, any_host: bool) -> str | None:
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:
            on_loop.append(False)
        return browser_refusal(headers, any_host=any_host)

    monkeypatch.setattr(app_module, "browser_refusal", refusal)
    with running_server() as server, httpx.Client(base_url=server.url) as http:
        assert http.get("/state").status_code == 200
        assert http.post("/step", json={"action": {"code": "print(1)"}}).status_code == 200
    assert on_loop == [True, True]
