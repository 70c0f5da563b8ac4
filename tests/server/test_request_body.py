"""parse_json_body and RequestLimits without a server: what they refuse, and that they name it."""
from __future__ import annotations

import pytest

from engine.entrypoints.openai.error_body import error_bytes
from engine.entrypoints.openai.limits import LimitError, RequestLimits
from engine.entrypoints.openai.protocol import OpenAIError
from engine.entrypoints.openai.request_body import MAX_JSON_DEPTH, parse_json_body


@pytest.mark.parametrize("raw", [
    b'{"a": "\\ud800"}', b'{"\\udfff": 1}', b'["\xed\xa0\x80"]', b"[" * 5000 + b"]" * 5000,
    b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), b"\xff", b'{"a": 1',
])
def test_refused_bodies_are_openai_errors(raw):
    with pytest.raises(OpenAIError) as e:
        parse_json_body(raw)
    assert e.value.status == 400


@pytest.mark.parametrize("raw,value", [
    (b'"\\ud83d\\ude00"', "\U0001F600"), (b'"\\\\ud800"', "\\ud800"), (b"1" * 64, int("1" * 64)),
    (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, None), (b'{"x": "[[[[[[[[[["}', {"x": "[[[[[[[[[["}),
    # huge integers become infinite floats: the field that reads one reports it
    (b"1" * 5000, float("inf")), (b"-" + b"1" * 65, float("-inf")),
])
def test_accepted_bodies(raw, value):
    got = parse_json_body(raw)
    if value is not None:
        assert got == value


def test_an_error_quoting_a_lone_surrogate_still_encodes():
    status, body = error_bytes(OpenAIError("The model `\ud800` does not exist.", status=404))
    assert status == 404 and b"\\ud800" in body
    assert error_bytes(OpenAIError("x", status=42))[0] == 500


def test_limits_name_their_flag():
    lim = RequestLimits(max_stop_strings=2, max_request_items=10)
    lim.check_body({"stop": ["a", "b"], "n": 5})
    with pytest.raises(LimitError, match="--max-stop-strings"):
        lim.check_body({"stop": ["a", "b", "c"]})
    with pytest.raises(LimitError, match="--max-request-items") as e:
        lim.check_body({"stop": ["a", "b"], "n": 6})
    assert e.value.param == "n" and e.value.code == "limit_exceeded"
    lim.check_body({"stop": "not a list", "n": "bad"})  # wrong types are the field readers' business
