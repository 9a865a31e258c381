"""jsontext: orjson's speed, with the standard library's range of values."""

from __future__ import annotations

import json
import math

import pytest

from coding_gym import jsontext


@pytest.mark.parametrize("text", [
    '{"type":"observation","data":{"observation":{"stdout":"1\\n","stderr":"","exit_code":0}}}',
    '[1, 2.5, -0.0, true, null, "é\\u00e9"]',
    b'{"bytes": "are JSON too"}',
])
def test_loads_reads_what_json_reads(text):
    assert jsontext.loads(text) == json.loads(text)


@pytest.mark.parametrize("text", ["[NaN, Infinity]", '["\\ud800 lone surrogate"]'])
def test_loads_falls_back_to_json_for_what_orjson_refuses(text):
    value, expected = jsontext.loads(text), json.loads(text)
    assert repr(value) == repr(expected)  # NaN != NaN: compare the text of the values
    if text.startswith("[NaN"):
        assert math.isnan(value[0]) and value[1] == math.inf


@pytest.mark.parametrize("text", ["", "{not json", "<html>busy</html>", '{"a": 1} trailing'])
def test_loads_raises_value_error_for_text_that_is_not_json(text):
    with pytest.raises(ValueError):
        jsontext.loads(text)


@pytest.mark.parametrize("value", [{"info": {"wall_time_s": 0.5}}, [1 << 60], "\ud800"])
def test_dumps_then_loads_gives_the_value_back(value):
    assert jsontext.loads(jsontext.dumps(value)) == value
