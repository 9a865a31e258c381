"""SessionManager: capacity, and the slots of sessions that are closing."""

from __future__ import annotations

import asyncio

import pytest

from coding_gym.models import Limits
from coding_gym.server.sessions import CapacityReached, SessionManager


def run(coroutine):
    return asyncio.run(coroutine)


def test_at_capacity_a_new_session_is_refused_at_once():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        await manager.open()
        with pytest.raises(CapacityReached, match="all 1 sessions are in use"):
            await manager.open()
        await manager.shutdown()

    run(scenario())


def test_a_new_session_waits_for_the_slot_of_one_that_is_closing():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        old = await manager.open()
        old.closing = True  # its client left; the server is killing its interpreter
        opening = asyncio.ensure_future(manager.open())
        await asyncio.sleep(0.05)
        assert not opening.done()
        await manager.close(old)
        new = await opening
        assert manager.sessions() == [new]
        await manager.shutdown()

    run(scenario())


def test_the_interpreter_a_step_killed_is_replaced_before_the_next_step():
    async def scenario() -> None:
        manager = SessionManager(Limits(), max_sessions=1, idle_timeout_s=60)
        session = await manager.open()
        await manager.call(session, session.reset)
        killed = session.backend.worker_pid
        reply = await manager.step(session, "import os\nos.kill(os.getpid(), 9)")
        assert reply["info"]["state_lost"]
        assert session.backend.worker_pid is None  # the reply did not wait for a new interpreter
        # With no request from the client, its successor starts.
        for _ in range(200):
            if session.backend.worker_pid is not None:
                break
            await asyncio.sleep(0.05)
        assert session.backend.worker_pid not in (None, killed)
        successor = session.backend.worker_pid
        reply = await manager.step(session, "print(1)")
        assert reply["observation"]["stdout"] == "1\n"
        assert session.backend.worker_pid == successor
        await manager.shutdown()

    run(scenario())
