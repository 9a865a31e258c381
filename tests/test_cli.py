"""The coding-gym command: `run` a file in the sandbox, `serve` the environment."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
from websockets.sync.client import connect

from coding_gym.cli import build_parser, main
from tests.servers import wait_for


def coding_gym(*args: str, **kwargs) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "coding_gym.cli", *args],
                          capture_output=True, timeout=120, **kwargs)


def test_run_prints_the_streams_and_exits_with_the_program(tmp_path):
    program = tmp_path / "prog.py"
    program.write_text("import sys\nprint('héllo')\nprint('warn', file=sys.stderr)\n"
                       "sys.exit(3)\n", encoding="utf-8")
    done = coding_gym("run", str(program))
    assert done.stdout.decode() == "héllo\n"
    assert done.stderr.decode() == "warn\n"
    assert done.returncode == 3


def test_run_reports_an_exception_with_exit_code_1(tmp_path):
    program = tmp_path / "boom.py"
    program.write_text("def f():\n    raise ValueError('boom')\nf()\n")
    done = coding_gym("run", str(program))
    assert done.returncode == 1
    assert "ValueError: boom" in done.stderr.decode()


def test_run_applies_the_time_limit(tmp_path):
    program = tmp_path / "slow.py"
    program.write_text("import time\ntime.sleep(60)\n")
    done = coding_gym("run", "--timeout-s", "0.5", str(program))
    assert done.returncode == 1
    assert "StepTimeout" in done.stderr.decode()


def test_run_missing_file_is_exit_2(tmp_path):
    done = coding_gym("run", str(tmp_path / "absent.py"))
    assert done.returncode == 2
    assert "cannot read" in done.stderr.decode()


def test_serve_refuses_a_negative_count_of_interpreters_ahead():
    done = coding_gym("serve", "--port", "0", "--start-ahead", "-1")
    assert done.returncode == 2
    assert "--start-ahead: expected 0 or a positive integer, got -1" in done.stderr.decode()


def test_serve_refuses_a_public_address_without_a_token():
    env = {k: v for k, v in os.environ.items() if k != "CODING_GYM_TOKEN"}
    done = coding_gym("serve", "--host", "0.0.0.0", "--port", "0", env=env)
    assert done.returncode == 2
    message = done.stderr.decode()
    assert "refusing to listen on 0.0.0.0 without a token" in message
    assert "--token" in message and "CODING_GYM_TOKEN" in message and "--insecure" in message


def _serve(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen([sys.executable, "-m", "coding_gym.cli", "serve", "--port", "0",
                                *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    assert process.stdout is not None
    first = process.stdout.readline()
    assert "serving CodingEnv-v0 on http://" in first, first + process.stderr.read()
    url = first.split(" on ", 1)[1].strip()
    web = process.stdout.readline()
    assert web.startswith(f"web UI: {url}/web/")
    return process, url


def _stop(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def test_serve_prints_the_url_and_serves_until_interrupted():
    process, url = _serve("--max-sessions", "3", "--timeout-s", "2", "--start-ahead", "2")
    try:
        assert httpx.get(f"{url}/health").json() == {"status": "healthy"}
        assert httpx.get(f"{url}/web/").status_code == 200
        assert httpx.get(f"{url}/sessions").json()["max_sessions"] == 3
        wait_for(lambda: httpx.get(f"{url}/sessions").json()["ready_ahead"] == 2)
        assert httpx.get(f"{url}/metadata").json()["limits"]["timeout_s"] == 2.0
        body = httpx.post(f"{url}/step", json={"action": {"code": "print(1 + 1)"}}).json()
        assert body["observation"]["stdout"] == "2\n"
    finally:
        _stop(process)
    assert process.returncode == 130  # Ctrl-C, after a clean shutdown
    assert "Traceback" not in process.stderr.read()


@pytest.mark.parametrize(("flags", "compressed"), [((), False), (("--ws-deflate",), True)],
                         ids=["default", "ws-deflate"])
def test_serve_declines_websocket_compression_unless_asked(flags, compressed):
    process, url = _serve(*flags)
    try:
        with connect(url.replace("http://", "ws://") + "/ws") as ws:  # offers compression
            ws.send(json.dumps({"type": "step", "data": {"code": "print('z' * 5000)"}}))
            reply = json.loads(ws.recv(timeout=30))
            agreed = ws.response.headers.get("Sec-WebSocket-Extensions", "")
    finally:
        _stop(process)
    assert reply["data"]["observation"]["stdout"] == "z" * 5000 + "\n"
    assert agreed.startswith("permessage-deflate") is compressed, agreed


def test_serve_with_a_token_from_the_environment_and_on_a_public_address():
    env = {**os.environ, "CODING_GYM_TOKEN": "from-env"}
    process, url = _serve("--host", "0.0.0.0", env=env)
    try:
        assert url.startswith("http://127.0.0.1:")
        step = {"action": {"code": "print(1)"}}
        assert httpx.post(f"{url}/step", json=step).status_code == 401
        ok = httpx.post(f"{url}/step", json=step, headers={"Authorization": "Bearer from-env"})
        assert ok.status_code == 200
    finally:
        _stop(process)


def test_serve_insecure_warns(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CODING_GYM_TOKEN"}
    process, url = _serve("--host", "0.0.0.0", "--insecure", env=env)
    try:
        assert httpx.post(f"{url}/step", json={"action": {"code": "1"}}).status_code == 200
    finally:
        _stop(process)
    assert "WARNING: no token" in process.stderr.read()


def test_serve_on_a_busy_port_is_a_clear_error():
    process, url = _serve()
    try:
        port = url.rsplit(":", 1)[1]
        done = coding_gym("serve", "--port", port)
        assert done.returncode == 1
        assert "cannot listen on 127.0.0.1:" in done.stderr.decode()
    finally:
        _stop(process)


def test_commands_are_subcommands(capsys):
    parser = build_parser()
    assert parser.parse_args(["run", "x.py"]).file == "x.py"
    assert parser.parse_args(["serve"]).host == "127.0.0.1"
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code == 2
    assert "serve" in capsys.readouterr().err


@pytest.mark.parametrize(("flags", "batch"), [((), True), (("--no-batch",), False)],
                         ids=["default", "no-batch"])
def test_serve_runs_its_event_loop_as_a_batch_thread_unless_asked_not_to(flags, batch):
    from coding_gym.sandbox.processes import descendants

    process, url = _serve(*flags)
    try:
        body = httpx.post(f"{url}/step", json={"action": {"code": "print(1)"}}).json()
        assert body["observation"]["stdout"] == "1\n"
        loop_policy = os.sched_getscheduler(process.pid)  # the main thread runs the loop
        zygotes = [pid for pid in descendants(process.pid)
                   if _parent_of(pid) == process.pid]
        zygote_policies = {os.sched_getscheduler(pid) for pid in zygotes}
    finally:
        _stop(process)
    assert process.returncode == 130
    assert loop_policy == (os.SCHED_BATCH if batch else os.SCHED_OTHER)
    # The zygote, started from the loop, puts itself back: its spares start up as before.
    assert zygotes and zygote_policies == {os.SCHED_OTHER}


def _parent_of(pid: int) -> int:
    """The parent's pid, or -1 once the process is gone (an interpreter being closed)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except FileNotFoundError:
        return -1
