"""Hostile programs against every backend: the sandbox must answer each one cleanly.

For every program of ``programs.py`` and every backend, the step must:

- return within the time limit plus one second;
- say clearly what happened (the program's own check: exit code, kill reason, message);
- be honest about state: variables of earlier steps survive exactly when
  ``info["state_lost"]`` is False;
- leave the env working, other sessions untouched and the server healthy;
- leave no process and no file descriptor behind once the env is closed.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from coding_gym.env import CodingEnv
from coding_gym.sandbox.processes import pid_alive
from tests.hostile.conftest import (
    Server,
    assert_nothing_leaked,
    take_resources,
)
from tests.hostile.programs import PROGRAMS, TIMEOUT_S, Outcome, Program

pytestmark = pytest.mark.timeout(120)


def _step(env: CodingEnv, code: str) -> Outcome:
    started = time.monotonic()
    observation, reward, terminated, truncated, info = env.step(code)
    elapsed = time.monotonic() - started
    assert reward == 0.0 and not terminated
    assert not truncated and info["infra_error"] is None, info  # the agent's fault, not ours
    return Outcome(observation["stdout"], observation["stderr"], observation["exit_code"],
                   info, elapsed)


@pytest.mark.parametrize("program", PROGRAMS, ids=[p.name for p in PROGRAMS])
def test_hostile_program(program: Program, backend: str, make_env: Callable[[], CodingEnv],
                         bystander: CodingEnv, isolation_report: dict[str, Any],
                         listeners: tuple[socket.socket, socket.socket],
                         request: pytest.FixtureRequest) -> None:
    if program.needs and not any(isolation_report[name]["active"] for name in program.needs):
        reasons = "; ".join(f"{n}: {isolation_report[n]['detail']}" for n in program.needs)
        pytest.skip(f"unsafe to run here without one of {program.needs} ({reasons})")
    server: Server | None = request.getfixturevalue("server") if backend == "remote" else None
    tcp, udp = listeners
    code = program.code.replace("{port}", str(tcp.getsockname()[1])).replace(
        "{udp_port}", str(udp.getsockname()[1]))
    before = take_resources(server)

    env = make_env()
    try:
        env.reset()
        _step(env, "marker = 'kept'")
        outcome = _step(env, code)
        assert outcome.elapsed_s <= TIMEOUT_S + 1.0, f"took {outcome.elapsed_s:.2f} s"
        program.check(outcome)

        after = _step(env, "print(globals().get('marker'), 6 * 7)")
        lost = outcome.info["state_lost"]
        assert after.exit_code == 0, after
        assert after.stdout == ("None 42\n" if lost else "kept 42\n"), (outcome, after)
        pids = [int(line) for line in outcome.stdout.split() if line.isdigit()]
        assert not program.prints_pid or pids, outcome
    finally:
        env.close()

    assert _step(bystander, "print(bystander)").stdout == "12345\n"
    if server is not None:
        assert server.process.poll() is None and server.healthy()
    for pid in pids if program.prints_pid else []:
        deadline = time.monotonic() + 10
        while pid_alive(pid):
            assert time.monotonic() < deadline, f"process {pid} outlived the episode"
            time.sleep(0.05)
    assert_nothing_leaked(before, server)
    with pytest.raises(BlockingIOError):
        tcp.accept()  # nothing connected to the host's loopback listener
    with pytest.raises(BlockingIOError):
        udp.recv(512)


def test_writes_to_the_private_tmp_do_not_reach_the_host(make_env, isolation_report):
    if not isolation_report["filesystem"]["active"]:
        pytest.skip(isolation_report["filesystem"]["detail"])
    name = f"coding-gym-hostile-{os.getpid()}"
    with make_env() as env:
        env.reset()
        outcome = _step(env, f"open('/tmp/{name}', 'w').write('x')\n"
                             f"open('../{name}', 'w').write('x')\nimport os\n"
                             f"print(os.path.exists('/tmp/{name}'))")
        assert outcome.stdout == "True\n"
    assert not os.path.exists(f"/tmp/{name}")


def test_the_suite_is_large_enough():
    assert len(PROGRAMS) >= 30
    assert len({program.name for program in PROGRAMS}) == len(PROGRAMS)
