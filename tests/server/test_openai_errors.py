"""Bad input gets a 4xx with OpenAI's error schema, before any streaming, and the server keeps serving."""
from __future__ import annotations

import socket

import openai
import pytest

from tests.server.conftest import API_KEY, MAX_BODY, MAX_MODEL_LEN, MODEL_NAME, http

pytestmark = pytest.mark.slow

CMPL = "/v1/completions"
CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
LONG_TEXT = "hello " * (MAX_MODEL_LEN + 50)

# (name, path, body, expected status, expected param)
CASES = [
    ("prompt missing", CMPL, {"model": MODEL_NAME}, 400, "prompt"),
    ("prompt wrong type", CMPL, {"prompt": 123}, 400, "prompt"),
    ("prompt empty list", CMPL, {"prompt": []}, 400, "prompt"),
    ("prompt empty string", CMPL, {"prompt": ""}, 400, "prompt"),
    ("prompt mixed list", CMPL, {"prompt": ["a", 5]}, 400, "prompt"),
    ("prompt token id out of vocab", CMPL, {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("prompt token id out of vocab in a batch", CMPL, {"prompt": [[1, 2], [3, 10**6]]}, 400, "prompt"),
    ("stop_token_ids out of vocab", CMPL, {"prompt": "hi", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ("allowed_token_ids out of vocab", CMPL, {"prompt": "hi", "allowed_token_ids": [1, 10**6]}, 400,
     "allowed_token_ids"),
    ("logit_bias id out of vocab", CMPL, {"prompt": "hi", "logit_bias": {"1000000": 1}}, 400, "logit_bias"),
    ("chat stop_token_ids out of vocab", CHAT, {"messages": USER, "stop_token_ids": [10**6]}, 400,
     "stop_token_ids"),
    ("prompt longer than context", CMPL, {"prompt": LONG_TEXT}, 400, "prompt"),
    ("prompt + max_tokens over context", CMPL, {"prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("max_tokens 0", CMPL, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens string", CMPL, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens fractional", CMPL, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("temperature negative", CMPL, {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("temperature huge integer", CMPL, {"prompt": "hi", "temperature": 10**400}, 400, "temperature"),
    ("temperature string", CMPL, {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("top_p zero", CMPL, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_p above one", CMPL, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("top_k zero", CMPL, {"prompt": "hi", "top_k": 0}, 400, "top_k"),
    ("min_p above one", CMPL, {"prompt": "hi", "min_p": 2}, 400, "min_p"),
    ("n zero", CMPL, {"prompt": "hi", "n": 0}, 400, "n"),
    ("n boolean", CMPL, {"prompt": "hi", "n": True}, 400, "n"),
    ("presence_penalty out of range", CMPL, {"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ("frequency_penalty out of range", CMPL, {"prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("repetition_penalty zero", CMPL, {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("logprobs too many", CMPL, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("stop wrong type", CMPL, {"prompt": "hi", "stop": 5}, 400, "stop"),
    ("stop empty string", CMPL, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("seed string", CMPL, {"prompt": "hi", "seed": "x"}, 400, "seed"),
    ("stream not boolean", CMPL, {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("stream_options without stream", CMPL, {"prompt": "hi", "stream_options": {"include_usage": True}}, 400,
     "stream_options"),
    ("bad field while streaming", CMPL, {"prompt": "hi", "stream": True, "max_tokens": 0}, 400, "max_tokens"),
    ("logit_bias bad key", CMPL, {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("unknown model", CMPL, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    ("body not an object", CMPL, ["hi"], 400, None),
    ("messages missing", CHAT, {"model": MODEL_NAME}, 400, "messages"),
    ("messages empty", CHAT, {"messages": []}, 400, "messages"),
    ("message role unknown", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("message content missing", CHAT, {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("message image part", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0]"),
    ("top_logprobs too many", CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("top_logprobs without logprobs", CHAT, {"messages": USER, "top_logprobs": 2}, 400, "top_logprobs"),
    ("max_completion_tokens 0", CHAT, {"messages": USER, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("chat prompt longer than context", CHAT, {"messages": [{"role": "user", "content": LONG_TEXT}]}, 400,
     "messages"),
    ("chat streaming, unknown model", CHAT, {"messages": USER, "model": "nope", "stream": True}, 404, "model"),
    ("tools unsupported", CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     "tools"),
    ("tokenize without prompt", "/tokenize", {}, 400, "prompt"),
    ("detokenize out of vocab", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
]


def assert_error(status: int, body: object, want_status: int, want_param: str | None = None) -> None:
    assert status == want_status, body
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if want_param is not None:
        assert err["param"] == want_param, err


def assert_still_serving(server) -> None:
    status, body = http(server, "POST", CMPL, {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body


@pytest.mark.parametrize("name,path,body,want_status,want_param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(server, name, path, body, want_status, want_param):
    status, out = http(server, "POST", path, body)
    assert_error(status, out, want_status, want_param)
    assert_still_serving(server)


@pytest.mark.parametrize(
    "name,method,path,data,headers,want_status",
    [
        ("malformed JSON", "POST", CMPL, b'{"prompt": "hi",', {"Content-Type": "application/json"}, 400),
        ("invalid UTF-8", "POST", CMPL, b'{"prompt": "\xff\xfe"}', {"Content-Type": "application/json"}, 400),
        ("wrong content type", "POST", CMPL, b'{"prompt": "hi"}', {"Content-Type": "text/plain"}, 415),
        ("no content type", "POST", CHAT, b'{"messages": []}', {}, 415),
        ("unknown endpoint", "GET", "/v1/engines", None, {}, 404),
        ("unknown top-level path", "POST", "/generate", b"{}", {"Content-Type": "application/json"}, 404),
        ("wrong method", "GET", CMPL, None, {}, 405),
    ],
    ids=lambda v: v if isinstance(v, str) and " " in v else None,
)
def test_malformed_http_gets_openai_error(server, name, method, path, data, headers, want_status):
    status, out = http(server, method, path, data=data, headers=headers)
    assert_error(status, out, want_status)
    assert_still_serving(server)


def test_body_over_size_limit_is_413(server):
    big = b'{"prompt": "' + b"a" * (MAX_BODY + 1000) + b'"}'
    status, out = http(server, "POST", CMPL, data=big, headers={"Content-Type": "application/json"})
    assert_error(status, out, 413)
    # chunked upload (no Content-Length): the limit holds while reading
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as s:
        s.sendall(
            f"POST {CMPL} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        chunk = b"a" * 65536
        try:
            for _ in range(MAX_BODY // len(chunk) + 4):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed early; the answer is still readable
        reply = b""
        while len(reply) < 65536:
            part = s.recv(4096)
            if not part:
                break
            reply += part
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b'"error"' in payload and b"request_too_large" in reply
    assert_still_serving(server)


def test_extreme_but_valid_values_do_not_hurt_the_engine(server):
    # the largest values the server's finite ranges and limits take (issue 15: 1e30 used to pass)
    body = {"prompt": "Hi", "max_tokens": 3, "temperature": 100, "top_k": 10**30, "repetition_penalty": 100,
            "seed": -(2**63), "priority": 10**30, "min_p": 1.0, "top_p": 1e-9, "n": 2,
            "logit_bias": {"5": -100, "6": 100}, "stop": ["x" * 256]}
    status, out = http(server, "POST", CMPL, body)
    assert status == 200, out
    assert len(out["choices"]) == 2
    status, out = http(server, "POST", CHAT, {"messages": USER, "max_tokens": 2, "temperature": 0,
                                              "logprobs": True, "top_logprobs": 20})
    assert status == 200, out
    assert http(server, "GET", "/health", auth=False)[0] == 200
    assert_still_serving(server)


def test_api_key_required_on_v1(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        status, out = http(server, "GET", "/v1/models", headers=headers, auth=False)
        assert_error(status, out, 401)
        assert out["error"]["code"] == "invalid_api_key"
    status, out = http(server, "POST", CMPL, {"prompt": "hi"}, auth=False)
    assert status == 401
    assert http(server, "GET", "/health", auth=False)[0] == 200  # not under /v1
    with pytest.raises(openai.AuthenticationError):
        with openai.OpenAI(base_url=server.base_url, api_key="nope", max_retries=0) as bad:
            bad.models.list()
    assert_still_serving(server)


def test_models_endpoint(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]
    assert models[0].object == "model" and isinstance(models[0].created, int) and models[0].owned_by


def test_openai_client_surfaces_errors(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages=USER, stream=True, temperature=-1)


@pytest.mark.parametrize(
    "path,body,param,words",
    [
        (CMPL, {"prompt": [7, 49152]}, "prompt", "out of range [0, 49152)"),
        (CMPL, {"prompt": "hi", "stop_token_ids": [5, 49152]}, "stop_token_ids", "outside the vocabulary"),
        (CHAT, {"messages": USER, "logit_bias": {"60000": 1}}, "logit_bias", "outside the vocabulary"),
        ("/detokenize", {"tokens": [1, 49152]}, "tokens", "out of range [0, 49152)"),
    ],
)
def test_input_processor_errors_keep_openais_shape(server, path, body, param, words):
    """The engine's InputProcessor checks the ids; the server reports them as OpenAI's 400."""
    status, out = http(server, "POST", path, body)
    assert_error(status, out, 400, param)
    assert out["error"]["type"] == "invalid_request_error" and out["error"]["code"] is None
    assert words in out["error"]["message"], out
    assert_still_serving(server)
