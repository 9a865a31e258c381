"""The interpreter started ahead: taken by new sessions and by resets, never shared, closed."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx

from coding_gym.models import Limits
from coding_gym.sandbox.processes import pid_alive
from coding_gym.server.ahead import InterpreterAhead
from coding_gym.server.sessions import SessionManager
from tests.servers import running_server, sessions_of, until, wait_for


def run(coroutine):
    return asyncio.run(coroutine)


async def ready_pid(ahead: InterpreterAhead) -> int:
    """Start an interpreter ahead (of one at most) and wait until it is ready; its worker's
    pid."""
    assert ahead.count == 1
    ahead.fill()
    await until(lambda: ahead.ready)
    pid = ahead._ready[0].worker_pid
    assert pid is not None
    return pid


def test_a_new_session_takes_the_interpreter_started_ahead_and_the_next_one_starts():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=2, idle_timeout_s=60)
        ahead_pid = await ready_pid(manager._ahead)
        session = await manager.open()
        assert session.backend.worker_pid == ahead_pid and session.fresh
        # Its first reset starts an episode on that interpreter: nothing to wait for.
        reply = await manager.reset(session, seed=3)
        assert session.backend.worker_pid == ahead_pid and session.fresh
        assert reply["info"]["step"] == 0
        step = await manager.step(session, "x = 41\nprint(x + 1)")
        assert step["observation"]["stdout"] == "42\n" and not session.fresh
        assert await ready_pid(manager._ahead) not in (None, ahead_pid)
        await manager.shutdown()

    run(scenario())


def test_a_reset_after_code_ran_takes_the_interpreter_ahead_and_kills_the_old_one():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        session = await manager.open()
        await manager.step(session, "x = 1")
        used = session.backend.worker_pid
        assert used is not None
        ahead_pid = await ready_pid(manager._ahead)
        await manager.reset(session)
        assert session.backend.worker_pid == ahead_pid
        reply = await manager.step(session, "print(x)")
        assert "NameError" in reply["observation"]["stderr"]  # a fresh interpreter
        await until(lambda: not pid_alive(used))
        await manager.shutdown()

    run(scenario())


def test_a_reset_before_any_code_keeps_the_fresh_interpreter():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        ahead_pid = await ready_pid(manager._ahead)
        session = await manager.open()
        await manager.reset(session)
        await manager.reset(session)  # nothing ran since: the interpreter is still fresh
        assert session.backend.worker_pid == ahead_pid
        await manager.shutdown()

    run(scenario())


def test_sessions_in_a_row_never_share_an_interpreter_or_a_directory():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=4, idle_timeout_s=60)
        seen_pids, seen_dirs = set(), set()
        for i in range(4):
            await ready_pid(manager._ahead)
            session = await manager.open()
            reply = await manager.step(
                session, f"import os\nopen('mine', 'w').write('{i}')\n"
                         "print(os.getpid(), os.getcwd(), sorted(os.listdir('.')))")
            _, cwd, listing = reply["observation"]["stdout"].split(" ", 2)
            assert listing.strip() == "['mine']"
            seen_pids.add(session.backend.worker_pid)
            seen_dirs.add(cwd)
        assert len(seen_pids) == 4 and len(seen_dirs) == 4
        await manager.shutdown()

    run(scenario())


def test_an_interpreter_that_died_while_ahead_is_not_handed_out():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        dead = await ready_pid(manager._ahead)
        os.kill(dead, signal.SIGKILL)
        await until(lambda: not pid_alive(dead))
        session = await manager.open()
        assert session.backend.worker_pid != dead and not session.fresh
        reply = await manager.step(session, "print('alive')")
        assert reply["observation"]["stdout"] == "alive\n"
        await manager.shutdown()

    run(scenario())


def test_when_no_interpreter_can_start_ahead_sessions_say_why_themselves():
    async def scenario() -> None:
        # One megabyte of address space: no interpreter can start in it.
        ahead = InterpreterAhead(Limits(memory_mb=1))
        ahead.fill()
        await asyncio.sleep(0)
        assert await ahead.take() is None  # waited for the start, which failed quietly
        await ahead.stop()

    run(scenario())


def test_shutdown_closes_the_interpreter_ahead(no_leaked_processes):
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        pid = await ready_pid(manager._ahead)
        await manager.shutdown()
        assert not pid_alive(pid)

    run(scenario())


def test_several_sessions_opened_together_each_take_one_started_ahead():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=3, idle_timeout_s=60, start_ahead=3)
        manager._ahead.fill()
        await until(lambda: manager.ready_ahead == 3)
        ahead_pids = {backend.worker_pid for backend in manager._ahead._ready}
        sessions = await asyncio.gather(*(manager.open() for _ in range(3)))
        assert {s.backend.worker_pid for s in sessions} == ahead_pids
        assert all(s.fresh for s in sessions) and manager.ready_ahead == 0
        await manager.shutdown()

    run(scenario())


def test_with_none_ahead_every_session_starts_its_own():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60, start_ahead=0)
        manager.start()
        session = await manager.open()
        await asyncio.sleep(0.1)
        assert not session.fresh and manager.ready_ahead == 0 and not manager._ahead._starting
        reply = await manager.step(session, "print('own')")
        assert reply["observation"]["stdout"] == "own\n"
        await manager.shutdown()

    run(scenario())


def test_what_an_interpreter_taken_ahead_starts_dies_with_its_episode(no_leaked_processes):
    spawn = ("import subprocess, sys\n"
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
             "print(p.pid)")
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        await ready_pid(manager._ahead)
        session = await manager.open()
        assert session.fresh
        first = await manager.step(session, spawn)
        assert first["observation"]["exit_code"] == 0, first
        await ready_pid(manager._ahead)
        await manager.reset(session)  # the old interpreter is closed in the background
        second = await manager.step(session, spawn)
        assert second["observation"]["exit_code"] == 0, second
        await manager.shutdown()

    run(scenario())


def test_stateless_steps_free_their_slot_after_the_reply(no_leaked_processes):
    # One slot: each step's session is closed after its reply, in time for the next step.
    with running_server(max_sessions=1) as server, httpx.Client(base_url=server.url) as http:
        for i in range(5):
            reply = http.post("/step", json={"action": {"code": f"print({i})"}}, timeout=60)
            assert reply.status_code == 200, reply.text
            assert reply.json()["observation"]["stdout"] == f"{i}\n"
        wait_for(lambda: sessions_of(server).active == 0)
