"""SessionManager: capacity, and the slots of sessions that are closing."""

from __future__ import annotations

import asyncio
import os

import pytest

from coding_gym.models import Limits
from coding_gym.server.session import Session
from coding_gym.server.sessions import CapacityReached, SessionManager, _Turn
from tests.helpers import in_thread
from tests.servers import until


def run(coroutine):
    return asyncio.run(coroutine)


async def one_session(limits: Limits) -> tuple[SessionManager, Session]:
    """A manager with one session, its episode started."""
    manager = SessionManager(limits, max_sessions=1, idle_timeout_s=60)
    session = await manager.open()
    await manager.call(session, session.reset)
    return manager, session


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
        manager, session = await one_session(Limits())
        killed = session.backend.worker_pid
        reply = await manager.step(session, "import os\nos.kill(os.getpid(), 9)")
        assert reply["info"]["state_lost"]
        assert session.backend.worker_pid is None  # the reply did not wait for a new interpreter
        # With no request from the client, its successor starts.
        await until(lambda: session.backend.worker_pid is not None)
        assert session.backend.worker_pid not in (None, killed)
        successor = session.backend.worker_pid
        reply = await manager.step(session, "print(1)")
        assert reply["observation"]["stdout"] == "1\n"
        assert session.backend.worker_pid == successor
        await manager.shutdown()

    run(scenario())


def test_a_step_waiting_for_a_fresh_interpreter_spends_its_time_limit_on_it():
    async def scenario() -> None:
        manager, session = await one_session(Limits(timeout_s=1.0))

        async def replacing() -> None:  # holds the turn as the replacement of a killed
            async with _Turn(session, client=False):  # interpreter does
                await asyncio.sleep(2.5)

        held = asyncio.ensure_future(replacing())
        await asyncio.sleep(0.05)
        reply = await manager.step(session, "print('ran')")
        assert not held.done()  # the reply came within the limit, not after the wait
        await held
        assert reply["observation"]["stdout"] == ""
        assert "time limit ran out before it could start" in reply["observation"]["stderr"]
        assert reply["info"]["kill_reason"] == "timeout"
        assert (await manager.step(session, "print('ran')"))["observation"]["stdout"] == "ran\n"
        await manager.shutdown()

    run(scenario())


def test_a_step_queued_behind_its_clients_earlier_call_gets_its_whole_time_limit():
    async def scenario() -> None:
        manager, session = await one_session(Limits(timeout_s=3.0))
        first = asyncio.ensure_future(manager.step(session, "import time\ntime.sleep(1.2)"))
        await asyncio.sleep(0.05)
        second = await manager.step(session, "print('second')", 1.0)
        assert (await first)["observation"]["exit_code"] == 0
        assert second["observation"]["stdout"] == "second\n"
        await manager.shutdown()

    run(scenario())


def test_a_step_run_in_a_thread_of_the_server_leaves_its_worker_free():
    # The server's threads take turns with every session's worker: none may pin one to its
    # CPU, as a thread that steps a worker of its own does (tests/sandbox/test_affinity.py).
    session = Session("pinned?", Limits())
    try:
        reply = in_thread(lambda: session.step("print(1)"), min(os.sched_getaffinity(0)))
        assert reply["observation"]["stdout"] == "1\n"
        pid = session.backend.worker_pid
        assert os.sched_getaffinity(pid) == os.sched_getaffinity(0)
        assert os.sched_getscheduler(pid) != os.SCHED_IDLE
    finally:
        session.close()
