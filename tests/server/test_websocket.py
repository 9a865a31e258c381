"""The /ws protocol: every message and error code, sessions, capacity, disconnects, tokens."""

from __future__ import annotations

import json
import threading
from contextlib import ExitStack

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from coding_gym.models import Limits
from coding_gym.sandbox.processes import pid_alive
from tests.servers import running_server, sessions_of, wait_for

TOKEN = "ws-token"


@pytest.fixture(scope="module")
def server():
    with running_server() as s:
        yield s


def ws_url(server, query: str = "") -> str:
    return server.url.replace("http://", "ws://") + "/ws" + query


@pytest.fixture
def ws(server):
    with connect(ws_url(server), max_size=None) as socket:
        yield socket


def ask(socket, message) -> dict:
    socket.send(message if isinstance(message, (str, bytes)) else json.dumps(message))
    return json.loads(socket.recv(timeout=30))


def step(socket, code: str, **extra) -> dict:
    return ask(socket, {"type": "step", "data": {"code": code}, **extra})


def test_reset_step_state_and_persistence(ws):
    reset = ask(ws, {"type": "reset", "data": {"episode_id": "e-1"}})
    assert reset["type"] == "observation"
    assert reset["data"]["observation"] == {"stdout": "", "stderr": "", "exit_code": 0}
    assert reset["data"]["reward"] is None and reset["data"]["done"] is False
    assert reset["data"]["info"] == {"episode_id": "e-1", "step": 0}

    assert step(ws, "total = 40")["data"]["observation"]["exit_code"] == 0
    reply = step(ws, "total += 2\nprint(total)")
    assert reply["type"] == "observation"
    assert reply["data"]["observation"] == {"stdout": "42\n", "stderr": "", "exit_code": 0}
    assert reply["data"]["reward"] == 0.0
    info = reply["data"]["info"]
    assert info["step"] == 2 and info["episode_id"] == "e-1"
    assert info["kill_reason"] is None and info["state_lost"] is False

    state = ask(ws, {"type": "state"})
    assert state == {"type": "state",
                     "data": {"episode_id": "e-1", "step_count": 2, "last_exit_code": 0}}


def test_reset_starts_a_fresh_interpreter(ws):
    step(ws, "gone = 1")
    ask(ws, {"type": "reset"})
    reply = step(ws, "print(gone)")
    assert "NameError" in reply["data"]["observation"]["stderr"]
    assert ask(ws, {"type": "state"})["data"]["step_count"] == 1


def test_step_before_reset_starts_an_episode(ws):
    reply = step(ws, "print('first')")
    assert reply["data"]["observation"]["stdout"] == "first\n"
    assert reply["data"]["info"]["step"] == 1


def test_seeded_reset_repeats_the_episode_id(ws):
    first = ask(ws, {"type": "reset", "data": {"seed": 11}})["data"]["info"]["episode_id"]
    again = ask(ws, {"type": "reset", "data": {"seed": 11, "unknown": True}})
    assert again["data"]["info"]["episode_id"] == first


def test_step_timeout_is_honoured(ws):
    reply = step(ws, "import time\ntime.sleep(60)", timeout_s=0.3)
    assert reply["data"]["info"]["kill_reason"] == "timeout"


def test_close_gets_no_reply_and_a_normal_close(server):
    with connect(ws_url(server)) as socket:
        step(socket, "x = 1")
        socket.send(json.dumps({"type": "close"}))
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd.code == 1000
    wait_for(lambda: sessions_of(server).active == 0)


@pytest.mark.parametrize(
    ("frame", "code", "words"),
    [("{not json", "INVALID_JSON", "not valid JSON"),
     ("[" * 100_000, "INVALID_JSON", "recursion"),
     ('{"type": "dance"}', "UNKNOWN_TYPE", "'dance'"),
     ('{"data": {}}', "UNKNOWN_TYPE", "None"),
     ("[1, 2]", "VALIDATION_ERROR", "JSON object"),
     ('{"type": "step"}', "VALIDATION_ERROR", "data: Field required"),
     ('{"type": "step", "data": {}}', "VALIDATION_ERROR", "data.code"),
     ('{"type": "step", "data": {"code": 1}}', "VALIDATION_ERROR", "data.code"),
     ('{"type": "step", "data": {"code": "1", "lang": "py"}}', "VALIDATION_ERROR", "data.lang"),
     ('{"type": "step", "data": {"code": "1"}, "timeout_s": -1}', "VALIDATION_ERROR",
      "timeout_s"),
     ('{"type": "step", "data": {"code": "1"}, "timeout_s": NaN}', "VALIDATION_ERROR",
      "timeout_s"),
     ('{"type": "reset", "data": {"seed": -3}}', "VALIDATION_ERROR", "data.seed"),
     ('{"type": "state", "extra": 1}', "VALIDATION_ERROR", "extra"),
     ('{"type": "close", "data": 5}', "VALIDATION_ERROR", "data")],
)
def test_bad_messages_get_an_error_and_the_session_continues(ws, frame, code, words):
    step(ws, "kept = 'still here'")
    reply = ask(ws, frame)
    assert reply["type"] == "error"
    assert reply["data"]["code"] == code
    assert words in reply["data"]["message"]
    assert step(ws, "print(kept)")["data"]["observation"]["stdout"] == "still here\n"


def test_validation_errors_carry_pydantic_details(ws):
    reply = ask(ws, {"type": "step", "data": {"code": "1", "lang": "py"}})
    assert reply["data"]["errors"][0]["type"] == "extra_forbidden"
    assert reply["data"]["errors"][0]["loc"] == ["step", "data", "lang"]


def test_binary_frames_carrying_json_are_accepted(ws):
    reply = ask(ws, json.dumps({"type": "step", "data": {"code": "print(1)"}}).encode())
    assert reply["data"]["observation"]["stdout"] == "1\n"


def test_oversized_message_is_refused_and_the_session_continues():
    with running_server(max_message_bytes=10_000) as server, connect(ws_url(server)) as socket:
        step(socket, "x = 'alive'")
        reply = step(socket, "#" * 20_000)
        assert reply["data"]["code"] == "VALIDATION_ERROR"
        assert "10000 bytes" in reply["data"]["message"]
        assert step(socket, "print(x)")["data"]["observation"]["stdout"] == "alive\n"


def test_replies_come_one_per_request_in_order(ws):
    ask(ws, {"type": "reset"})
    messages = [{"type": "step", "data": {"code": f"print({i})"}} for i in range(5)]
    messages.insert(2, {"type": "bogus"})
    messages.insert(4, {"type": "state"})
    for message in messages:
        ws.send(json.dumps(message))
    replies = [json.loads(ws.recv(timeout=30)) for _ in messages]
    assert [r["type"] for r in replies] == ["observation", "observation", "error", "observation",
                                            "state", "observation", "observation"]
    printed = [r["data"]["observation"]["stdout"] for r in replies if r["type"] == "observation"]
    assert printed == [f"{i}\n" for i in range(5)]
    assert replies[4]["data"]["step_count"] == 3


def test_execution_error_when_the_interpreter_cannot_start():
    # One megabyte of address space: no interpreter can start in it.
    with running_server(limits=Limits(memory_mb=1)) as server, connect(ws_url(server)) as socket:
        for _ in range(2):
            reply = step(socket, "print(1)")
            assert reply["type"] == "error"
            assert reply["data"]["code"] == "EXECUTION_ERROR"
            assert "could not run the request" in reply["data"]["message"]
        assert ask(socket, {"type": "state"})["type"] == "state"


def test_two_sessions_are_isolated(server):
    with connect(ws_url(server)) as a, connect(ws_url(server)) as b:
        step(a, "secret = 'a'\nimport os\nopen('mine.txt', 'w').write('a')")
        step(b, "secret = 'b'")
        assert step(a, "print(secret)")["data"]["observation"]["stdout"] == "a\n"
        assert step(b, "print(secret)")["data"]["observation"]["stdout"] == "b\n"
        listing = step(b, "import os\nprint(os.listdir('.'))")
        assert listing["data"]["observation"]["stdout"] == "[]\n"
        ids = {ask(s, {"type": "state"})["data"]["episode_id"] for s in (a, b)}
        assert len(ids) == 2


def test_32_concurrent_sessions_each_step(server):
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            with connect(ws_url(server)) as socket:
                ask(socket, {"type": "reset"})
                step(socket, f"n = {i}")
                for _ in range(3):
                    reply = step(socket, "n += 1000\nprint(n)")
                assert reply["data"]["observation"]["stdout"] == f"{i + 3000}\n"
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors[:3]
    wait_for(lambda: sessions_of(server).active == 0)


def test_capacity_reached_is_sent_once_then_closed():
    with running_server(max_sessions=1) as server, connect(ws_url(server)) as first:
        step(first, "x = 1")
        with connect(ws_url(server)) as second:
            reply = json.loads(second.recv(timeout=10))
            assert reply["type"] == "error"
            assert reply["data"]["code"] == "CAPACITY_REACHED"
            assert reply["data"]["max_sessions"] == 1
            with pytest.raises(ConnectionClosed) as closed:
                second.recv(timeout=10)
            assert closed.value.rcvd.code == 1013
        assert step(first, "print(x)")["data"]["observation"]["stdout"] == "1\n"


def test_a_client_reconnecting_at_capacity_gets_the_slot_it_left():
    with running_server(max_sessions=1) as server:
        for n in range(5):
            with connect(ws_url(server)) as socket:
                assert step(socket, f"print({n})")["data"]["observation"]["stdout"] == f"{n}\n"


def open_session(socket, manager):
    """Start an episode on ``socket``; the server's session behind it."""
    episode_id = f"ep-{id(socket)}"
    ask(socket, {"type": "reset", "data": {"episode_id": episode_id}})
    return next(s for s in manager.sessions() if s.episode_id == episode_id)


def test_disconnect_mid_step_kills_the_worker_and_frees_the_slot(server):
    manager = sessions_of(server)
    with connect(ws_url(server)) as socket:
        session = open_session(socket, manager)
        pid = session.backend.worker_pid
        socket.send(json.dumps({"type": "step",
                                "data": {"code": "import time\ntime.sleep(60)"}}))
        wait_for(lambda: session.busy)
    wait_for(lambda: manager.get(session.id) is None)
    assert not pid_alive(pid)


def test_dropped_connection_mid_step_kills_the_worker(server):
    manager = sessions_of(server)
    with connect(ws_url(server)) as socket:
        session = open_session(socket, manager)
        pid = session.backend.worker_pid
        socket.send(json.dumps({"type": "step", "data": {"code": "while True:\n    pass"}}))
        wait_for(lambda: session.busy)
        socket.socket.close()  # no closing handshake: the peer just vanishes
    wait_for(lambda: manager.get(session.id) is None)
    assert not pid_alive(pid)


def test_idle_session_is_closed_by_the_server():
    with running_server(idle_timeout_s=0.3) as server, connect(ws_url(server)) as socket:
        step(socket, "x = 1")
        pid = sessions_of(server).sessions()[0].backend.worker_pid
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=30)
        assert closed.value.rcvd.code == 1000
        assert "idle" in closed.value.rcvd.reason
        wait_for(lambda: sessions_of(server).active == 0)
        assert not pid_alive(pid)


def test_shutdown_kills_every_worker(no_leaked_processes):
    with running_server() as server, ExitStack() as stack:
        for _ in range(3):
            socket = stack.enter_context(connect(ws_url(server)))
            step(socket, "import subprocess\nsubprocess.Popen(['sleep', '300'])")
        server.stop()


@pytest.fixture(scope="module")
def token_server():
    with running_server(token=TOKEN) as s:
        yield s


@pytest.mark.parametrize(("headers", "query"), [
    (None, ""), ({"Authorization": "Bearer wrong"}, ""), (None, "?token=no"),
])
def test_missing_or_wrong_token_is_closed_with_4401(token_server, headers, query):
    with connect(ws_url(token_server, query), additional_headers=headers) as socket, \
            pytest.raises(ConnectionClosed) as closed:
        socket.send(json.dumps({"type": "state"}))
        socket.recv(timeout=10)
    assert closed.value.rcvd.code == 4401
    assert sessions_of(token_server).active == 0


@pytest.mark.parametrize(("headers", "query"), [
    ({"Authorization": f"Bearer {TOKEN}"}, ""), (None, f"?token={TOKEN}"),
])
def test_token_in_header_or_query_is_accepted(token_server, headers, query):
    with connect(ws_url(token_server, query), additional_headers=headers) as socket:
        assert step(socket, "print('in')")["data"]["observation"]["stdout"] == "in\n"


def test_page_of_another_site_is_refused(server):
    with connect(ws_url(server), origin="http://attacker.example") as socket:
        reply = json.loads(socket.recv(timeout=10))
        assert reply["data"]["code"] == "FORBIDDEN"
        with pytest.raises(ConnectionClosed) as closed:
            socket.recv(timeout=10)
    assert closed.value.rcvd.code == 4403


def test_own_page_may_connect(server):
    with connect(ws_url(server), origin=server.url) as socket:
        assert step(socket, "print('same origin')")["data"]["observation"]["stdout"] == \
            "same origin\n"
