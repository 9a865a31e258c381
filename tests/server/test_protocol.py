"""Parsing WebSocket messages: the hand check of plain steps agrees with the models."""

from __future__ import annotations

import json
import math

import pytest
from pydantic import ValidationError

from coding_gym.server import protocol

STEP_MESSAGES = [
    {"type": "step", "data": {"code": "print(1)"}},
    {"type": "step", "data": {"code": "x = 'é\\ud800'"}, "timeout_s": 2.5},
    {"type": "step", "data": {"code": ""}, "timeout_s": None},
    {"type": "step", "data": {"code": "1"}, "timeout_s": 5},
    {"type": "step", "data": {"code": "1"}, "timeout_s": 10**30},
    {"type": "step", "data": {"code": "1", "metadata": {"k": 1}}},
    {"type": "step", "data": {"code": "1"}, "timeout_s": -1.0},
    {"type": "step", "data": {"code": "1"}, "timeout_s": 0.0},
    {"type": "step", "data": {"code": "1"}, "timeout_s": math.nan},
    {"type": "step", "data": {"code": "1"}, "timeout_s": math.inf},
    {"type": "step", "data": {"code": "1"}, "timeout_s": True},
    {"type": "step", "data": {"code": "1"}, "timeout_s": "2"},
    {"type": "step", "data": {"code": 1}},
    {"type": "step", "data": {"code": None}},
    {"type": "step", "data": {"cod": "1"}},
    {"type": "step", "data": {}},
    {"type": "step", "data": "print(1)"},
    {"type": "step", "data": {"code": "1"}, "extra": 1},
    {"type": "step", "timeout_s": 1.0, "extra": 1},
    {"type": "step"},
]


@pytest.mark.parametrize("message", STEP_MESSAGES)
def test_step_messages_parse_as_the_models_validate_them(message):
    frame = json.dumps(message)  # NaN and Infinity as Python's json writes them
    try:
        expected = protocol._MESSAGE.validate_python(json.loads(frame))
    except ValidationError:
        with pytest.raises(protocol.ProtocolError) as refused:
            protocol.parse_message(frame, 1 << 20)
        assert refused.value.code == protocol.VALIDATION_ERROR
        return
    assert isinstance(expected, protocol.StepMessage)
    request = protocol.parse_message(frame, 1 << 20)
    assert request == protocol.Request("step", expected.data.code, expected.timeout_s)
    assert type(request.timeout_s) is type(expected.timeout_s)


@pytest.mark.parametrize(("frame", "request_"), [
    ('{"type": "reset"}', protocol.Request("reset")),
    ('{"type": "reset", "data": {"seed": 3, "episode_id": "e"}}',
     protocol.Request("reset", seed=3, episode_id="e")),
    ('{"type": "state"}', protocol.Request("state")),
    ('{"type": "close"}', protocol.Request("close")),
])
def test_other_messages_become_requests(frame, request_):
    assert protocol.parse_message(frame, 1 << 20) == request_
