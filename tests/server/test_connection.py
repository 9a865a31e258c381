"""Connection: a WebSocket's requests answered one by one, in order, whatever their pace.

These drive a :class:`Connection` through its ASGI ``receive`` and ``send`` directly, with a
real session, so the order in which messages arrive is exact and repeatable.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from coding_gym.models import Limits
from coding_gym.server.connection import _MAX_PENDING, Connection
from coding_gym.server.sessions import SessionManager


def step_message(i: int) -> dict[str, Any]:
    return {"type": "websocket.receive",
            "text": json.dumps({"type": "step", "data": {"code": f"print({i})"}})}


async def answer(messages: int, burst: int) -> list[str]:
    """The stdout of each reply to ``messages`` pipelined steps, which arrive ``burst`` at a
    time (each burst whole before the connection's tasks run again)."""
    manager = SessionManager(Limits(timeout_s=10), max_sessions=1, idle_timeout_s=60)
    session = await manager.open()
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    outputs: list[str] = []
    sent = 0

    def deliver() -> None:
        nonlocal sent
        for _ in range(min(burst, messages - sent)):
            inbox.put_nowait(step_message(sent))
            sent += 1

    async def send(event: dict[str, Any]) -> None:
        outputs.append(json.loads(event["text"])["data"]["observation"]["stdout"])
        if len(outputs) == messages:
            inbox.put_nowait({"type": "websocket.disconnect", "code": 1000})
        elif inbox.empty():
            deliver()

    deliver()
    try:
        await asyncio.wait_for(
            Connection(inbox.get, send, session, manager, 1 << 20).serve(), 60)
    finally:
        await manager.shutdown()
    return outputs


def test_a_backlog_taken_without_a_pause_is_answered_in_order():
    # A backlog already queued by the server (it came before the session started) is read
    # without a turn of the loop between messages: past the read-ahead limit, the reader
    # waits for room while the request loop has been woken and not yet run.
    messages = 3 * _MAX_PENDING + 8
    assert asyncio.run(answer(messages, burst=messages)) == [f"{i}\n" for i in range(messages)]


def test_bursts_around_the_read_ahead_limit_are_answered_in_order():
    for burst in (_MAX_PENDING - 1, _MAX_PENDING, _MAX_PENDING + 1):
        messages = 2 * burst + 5
        outputs = asyncio.run(answer(messages, burst))
        assert outputs == [f"{i}\n" for i in range(messages)], burst
