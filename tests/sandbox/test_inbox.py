"""Inbox: a step's reply read whole and alone, or anything else left for receive()."""

from __future__ import annotations

import socket

import pytest

from coding_gym.sandbox import protocol
from coding_gym.sandbox.inbox import Inbox

RESULT = protocol.encode_result(3, "timeout", 5_000, 7_000, 2, 0)


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield Inbox(ours), theirs
    ours.close()
    theirs.close()


def test_a_result_alone_is_read_into_its_fields(pair):
    inbox, worker = pair
    worker.sendall(RESULT)
    assert inbox.receive_result() == (3, protocol.KILL_REASONS.index("timeout"), 5_000, 7_000,
                                      2, 0)
    assert inbox.receive(with_fds=False) == []
    assert inbox.connected


def test_anything_more_than_one_result_is_left_for_receive(pair):
    inbox, worker = pair
    worker.sendall(RESULT + protocol.encode({"type": "pong"}))
    assert inbox.receive_result() is None
    messages = [message for message, _ in inbox.receive(with_fds=False)]
    assert [message["type"] for message in messages] == ["result", "pong"]
    assert messages[0]["exit_code"] == 3 and messages[0]["kill_reason"] == "timeout"


def test_a_reply_in_pieces_is_put_together_by_receive(pair):
    inbox, worker = pair
    worker.sendall(RESULT[:10])
    assert inbox.receive_result() is None
    assert inbox.receive(with_fds=False) == []
    worker.sendall(RESULT[10:])
    [(message, fds)] = inbox.receive(with_fds=False)
    assert message["wall_ns"] == 5_000 and fds == []


def test_a_closed_socket_or_garbage_disconnects(pair):
    inbox, worker = pair
    worker.sendall(protocol.HEADER.pack(4) + b"junk")
    assert inbox.receive_result() is None
    assert inbox.receive(with_fds=False) == [] and not inbox.connected
    other, peer = socket.socketpair()
    other.setblocking(False)
    peer.close()
    closed = Inbox(other)
    assert closed.receive_result() is None and not closed.connected
    other.close()
