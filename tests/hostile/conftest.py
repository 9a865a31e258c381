"""Fixtures of the hostile suite: every backend, a bystander session, leak accounting.

The remote backend talks to ``coding-gym serve`` run as a separate process on a loopback
port, with a token, exactly as a user would run it: a program that hurt the server would
show up as a dead or sick server, not as a dead test run.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from coding_gym.backends.local import LocalBackend
from coding_gym.env import CodingEnv
from tests.helpers import descendant_pids, settle
from tests.hostile.programs import SECRET_NAME, SECRET_VALUE, TIMEOUT_S

MEMORY_MB = 512
TOKEN = "hostile-suite-token"
BACKENDS = ("local", "remote")


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: str

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


@pytest.fixture(scope="session", autouse=True)
def secret_in_environment() -> Iterator[None]:
    """A fake secret in this process's environment (and the server's): nothing may show it."""
    os.environ[SECRET_NAME] = SECRET_VALUE
    yield
    os.environ.pop(SECRET_NAME, None)


@pytest.fixture(scope="session")
def server(secret_in_environment: None) -> Iterator[Server]:
    fd, log_path = tempfile.mkstemp(prefix="coding-gym-hostile-server-", suffix=".log")
    command = [sys.executable, "-m", "coding_gym.cli", "serve", "--host", "127.0.0.1",
               "--port", "0", "--token", TOKEN, "--timeout-s", str(TIMEOUT_S),
               "--memory-mb", str(MEMORY_MB),
               # The leak checks compare pids: an interpreter started ahead would be a new
               # pid after every test (its path is checked in tests/server/test_ahead.py).
               "--start-ahead", "0"]
    process = subprocess.Popen(command, stdout=fd, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL)
    os.close(fd)
    deadline = time.monotonic() + 60
    url = None
    while url is None:
        with open(log_path) as f:
            found = re.search(r"serving CodingEnv-v0 on (http://\S+)", f.read())
        if found:
            url = found.group(1)
        elif process.poll() is not None or time.monotonic() > deadline:
            with open(log_path) as f:
                pytest.fail(f"coding-gym serve did not start:\n{f.read()}")
        else:
            time.sleep(0.05)
    running = Server(url, process, log_path)
    _server_logs.append(log_path)
    while not running.healthy():
        assert time.monotonic() < deadline, "the server never became healthy"
        time.sleep(0.05)
    yield running
    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    _server_logs.remove(log_path)
    os.unlink(log_path)


#: The log of the running server, attached to the report of any test here that fails.
_server_logs: list[str] = []
#: How much of the end of that log a report shows.
_LOG_TAIL_CHARS = 8000


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with the server's last log lines: the server runs in a
    process of its own, and its log goes when the run ends."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed and _server_logs:
        try:
            with open(_server_logs[-1], errors="replace") as f:
                tail = f.read()[-_LOG_TAIL_CHARS:]
        except OSError as e:
            tail = f"(the log could not be read: {e})"
        report.sections.append(("coding-gym serve log, its end", tail))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_env(backend: str, request: pytest.FixtureRequest) -> Callable[[], CodingEnv]:
    """A factory of envs of ``backend`` with the suite's short time limit."""
    options: dict[str, Any] = {}
    if backend == "remote":
        server: Server = request.getfixturevalue("server")
        options = {"base_url": server.url, "token": TOKEN}

    def make() -> CodingEnv:
        return CodingEnv(backend, timeout_s=TIMEOUT_S, memory_mb=MEMORY_MB, **options)
    return make


@pytest.fixture(scope="session")
def isolation_report() -> dict[str, Any]:
    """The layers active on this machine (the server runs here too, with the same rights)."""
    with LocalBackend() as probe:
        probe.reset()
        report: dict[str, Any] = probe.describe()["isolation"]
    return report


@pytest.fixture(scope="session")
def bystanders(request: pytest.FixtureRequest) -> Iterator[dict[str, CodingEnv]]:
    """One long-lived session per backend, holding a variable every test checks."""
    envs: dict[str, CodingEnv] = {}
    yield envs
    for env in envs.values():
        env.close()


@pytest.fixture
def bystander(backend: str, bystanders: dict[str, CodingEnv],
              make_env: Callable[[], CodingEnv]) -> CodingEnv:
    if backend not in bystanders:
        env = make_env()
        env.reset()
        env.step("bystander = 12345")
        settle(env.unwrapped.backend)
        bystanders[backend] = env
    return bystanders[backend]


@dataclass
class Resources:
    """Processes below this one and open fds (here and in the server), to compare."""

    pids: set[int]
    fds: dict[int, int] = field(default_factory=dict)


def _fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def take_resources(server: Server | None) -> Resources:
    pids = {os.getpid()} | ({server.process.pid} if server is not None else set())
    return Resources(descendant_pids(), {pid: _fd_count(pid) for pid in pids})


def assert_nothing_leaked(before: Resources, server: Server | None,
                          timeout_s: float = 15.0) -> None:
    """Wait (sessions close asynchronously) until processes and fds are back to ``before``."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = take_resources(server)
        leaked_pids = now.pids - before.pids
        grown = {pid: (before.fds[pid], count) for pid, count in now.fds.items()
                 if count > before.fds.get(pid, 0)}
        if not leaked_pids and not grown:
            return
        if time.monotonic() > deadline:
            described = {pid: _describe(pid) for pid in sorted(leaked_pids)}
            pytest.fail(f"leaked processes {described}; fd counts (before, after) {grown}")
        time.sleep(0.05)


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:80]
    except OSError:
        return "?"


@pytest.fixture(scope="session")
def listeners() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A TCP listener and a UDP socket on loopback: no program may reach either."""
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen()
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.setblocking(False)
    yield tcp, udp
    tcp.close()
    udp.close()
