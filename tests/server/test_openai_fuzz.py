"""Random request bodies: every answer is a success or an OpenAI error, and the server stays healthy."""
from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import MODEL_NAME, http

pytestmark = pytest.mark.slow

# any JSON value, kept small
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
# plausible values (some out of range); at most one field is then replaced by arbitrary JSON, so
# both the happy path and every validator are reached
small_int = st.integers(-1, 4)
fields = {
    "model": st.sampled_from([MODEL_NAME, MODEL_NAME, "other"]),
    "max_completion_tokens": small_int,
    "n": small_int,
    "temperature": st.floats(-0.5, 3),
    "top_p": st.floats(-0.2, 1.2),
    "top_k": st.integers(-2, 100),
    "min_p": st.floats(-0.2, 1.2),
    "seed": st.integers(-(2**64), 2**64),
    "stop": st.lists(st.text(max_size=3), max_size=3) | st.text(max_size=3),
    "logprobs": small_int | st.booleans(),
    "top_logprobs": st.integers(-1, 22),
    "echo": st.booleans(),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "repetition_penalty": st.floats(-1, 3),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "2", "x", "-1"]), st.floats(-200, 200), max_size=2),
    "ignore_eos": st.booleans(),
}
prompts = st.sampled_from(["Hi", "", ["a", "b"], [1, 2, 3], [[1, 2], [3]], [], [10**9], 5])
messages = st.sampled_from([
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [],
    [{"role": "user"}],
    [{"role": "robot", "content": "x"}],
    [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    "Hi",
])


@st.composite
def bodies(draw, key: str, values) -> dict:
    # max_tokens is always there: a valid default would generate up to the whole context
    body = {key: draw(values), "max_tokens": draw(small_int)}
    for name in draw(st.lists(st.sampled_from(sorted(fields)), max_size=3, unique=True)):
        body[name] = draw(fields[name])
    if draw(st.integers(0, 3)) == 0:
        body[draw(st.sampled_from(sorted({key, "max_tokens", *fields})))] = draw(json_values)
    return body


OUTCOMES: list[int] = []


@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions"]), data=st.data())
def test_random_bodies_get_success_or_openai_error(server, endpoint, data):
    body = data.draw(bodies("prompt", prompts) if endpoint == "/v1/completions" else bodies("messages", messages))
    status, out = http(server, "POST", endpoint, body, timeout=120)
    OUTCOMES.append(status)
    if status == 200:
        if isinstance(out, dict):
            assert out["choices"] and "usage" in out
        else:  # a stream
            assert out.endswith("data: [DONE]\n\n") and '"error"' not in out, out[-500:]
    else:
        assert status in (400, 404), (status, out)
        assert isinstance(out, dict) and set(out["error"]) == {"message", "type", "param", "code"}
    assert http(server, "GET", "/health", auth=False)[0] == 200


def test_fuzz_reached_the_happy_path():
    # runs after the fuzz test (file order): the generator must produce accepted requests too
    assert OUTCOMES.count(200) >= 5 and len(OUTCOMES) - OUTCOMES.count(200) >= 5, OUTCOMES


# ---- hostile text and shapes: all of Unicode (lone surrogates too), deep nesting, huge numbers ----
any_text = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=12)


@st.composite
def hostile_bodies(draw, key: str) -> bytes:
    """A request body as raw bytes: json.dumps escapes lone surrogates (\\udXXX), and the deep or
    huge parts are spliced in as text (json.dumps itself refuses integers past 4300 digits)."""
    body = {key: draw(any_text) if key == "prompt" else [{"role": draw(st.sampled_from(["user", "system"])),
                                                          "content": draw(any_text)}],
            "max_tokens": 1}
    for name in draw(st.lists(st.sampled_from(["model", "stop", "user", "logit_bias", any_text]), max_size=3)):
        if isinstance(name, str) and name in ("model", "stop", "user"):
            body[name] = draw(any_text)
        elif name == "logit_bias":
            body[name] = {draw(any_text): 1}
        else:
            body[draw(name)] = draw(any_text)
    text = json.dumps(body)
    splice = draw(st.sampled_from(["none", "deep", "digits", "float"]))
    if splice == "deep":
        d = draw(st.integers(30, 3000))
        text = text[:-1] + f', "n": {"[" * d}{"]" * d}}}'
    elif splice == "digits":
        text = text[:-1] + f', "{draw(st.sampled_from(["seed", "n", "max_tokens", "x"]))}": ' \
            f'{"-" if draw(st.booleans()) else ""}{"7" * draw(st.integers(20, 6000))}}}'
    elif splice == "float":
        text = text[:-1] + f', "temperature": 1{"0" * draw(st.integers(300, 5000))}.5e{draw(st.integers(-400, 400))}}}'
    return text.encode()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize"]), data=st.data())
def test_hostile_bodies_never_get_a_500(server, endpoint, data):
    key = "messages" if endpoint.endswith("chat/completions") else "prompt"
    raw = data.draw(hostile_bodies(key))
    status, out = http(server, "POST", endpoint, data=raw, headers={"Content-Type": "application/json"}, timeout=120)
    assert status in (200, 400, 404), (status, out, raw[:300])
    if status != 200:
        assert isinstance(out, dict) and set(out["error"]) == {"message", "type", "param", "code"}, out
    assert http(server, "GET", "/health", auth=False)[0] == 200
