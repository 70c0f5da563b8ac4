"""Adversarial input against the real shared server: never a 500, OpenAI's error shape, limits that
name their flag, auth on every route, numeric safety, and no stall of other streams."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import pytest

from engine.entrypoints.openai.limits import DEFAULT_MAX_STOP_STRING_LENGTH as MAX_STOP_LEN
from engine.entrypoints.openai.limits import DEFAULT_MAX_STOP_STRINGS as MAX_STOPS
from tests.server.conftest import API_KEY, MODEL_NAME, http

CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
ERROR_KEYS = {"message", "type", "param", "code"}


def assert_error(status: int, out: object, want: int, param: str | None = None, text: str | None = None) -> dict:
    assert status == want, (status, out)
    assert isinstance(out, dict) and set(out) == {"error"} and set(out["error"]) == ERROR_KEYS, out
    if param is not None:
        assert out["error"]["param"] == param, out
    if text is not None:
        assert text in out["error"]["message"], out
    return out["error"]


def raw(server, path: str, body: bytes, headers: dict | None = None, auth: bool = True) -> tuple[int, object]:
    return http(server, "POST", path, data=body, headers={**JSON, **(headers or {})}, auth=auth)


def healthy(server) -> None:
    assert http(server, "GET", "/health", auth=False)[0] == 200
    status, out = http(server, "POST", CMPL, {"prompt": "Hi", "max_tokens": 1})
    assert status == 200, out


@pytest.mark.parametrize("name,path,body,param", [
    ("lone surrogate in prompt", CMPL, b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("lone low surrogate in chat", CHAT, b'{"messages": [{"role": "user", "content": "\\udc00"}]}',
     "messages[0].content"),
    ("lone surrogate in model", CMPL, b'{"prompt": "x", "model": "\\ud800"}', "model"),
    ("lone surrogate to /tokenize", "/tokenize", b'{"prompt": "\\udfff"}', "prompt"),
    ("lone surrogate in a key", CMPL, b'{"prompt": "x", "\\ud800": 1}', None),
    ("lone surrogate in stop", CMPL, b'{"prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),
    ("encoded surrogate bytes", CMPL, b'{"prompt": "\xed\xa0\x80"}', None),
    ("2000-deep nesting", CMPL, b'{"prompt": ' + b"[" * 2000 + b"]" * 2000 + b"}", None),
    ("100-deep nesting", CHAT, b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", None),
    ("5000-digit integer", CMPL, b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", "max_tokens"),
    ("5000-digit negative seed", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "seed": -' + b"9" * 5000
     + b"}", "seed"),
    ("5000-digit integer in an array", CMPL, b'{"prompt": [' + b"1" * 5000 + b"]}", "prompt"),
    ("400-digit n", CMPL, b'{"prompt": "x", "n": 1' + b"0" * 400 + b"}", "n"),
    ("NaN", CMPL, b'{"prompt": "x", "temperature": NaN}', "temperature"),
    ("Infinity logit_bias", CMPL, b'{"prompt": "x", "logit_bias": {"5": Infinity}}', "logit_bias"),
])
def test_hostile_bodies_get_400(server, name, path, body, param):
    status, out = raw(server, path, body)
    err = assert_error(status, out, 400, param)
    assert err["type"] == "invalid_request_error"
    healthy(server)


def test_a_valid_surrogate_pair_is_text(server):
    status, out = raw(server, "/tokenize", b'{"prompt": "\\ud83d\\ude00"}')
    assert status == 200 and out["count"] >= 1, out


def _raw_request(server, head: bytes, timeout: float = 10) -> bytes:
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def test_non_utf8_authorization_header_is_401(server):
    body = b'{"prompt": "hi", "max_tokens": 1}'
    resp = _raw_request(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\x80\r\n"
                                b"Content-Type: application/json\r\nConnection: close\r\n"
                                b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    head, _, payload = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), resp[:300]
    assert json.loads(payload)["error"]["code"] == "invalid_api_key"
    healthy(server)


@pytest.mark.parametrize("head", [
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",  # not a number
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n",  # over aiohttp's 8190
    b"GET /health HTTP/1.1\r\nHost x\r\n\r\n",  # a header line without a colon
    b"GET /health HTTP/9\r\n\r\n",  # no such version
])
def test_malformed_http_is_a_json_400(server, head):
    """aiohttp rejects these before the app sees them; the answer is still OpenAI's error shape."""
    resp = _raw_request(server, head)
    status_line, _, rest = resp.partition(b"\r\n")
    headers, _, payload = rest.partition(b"\r\n\r\n")
    assert status_line.split()[1].startswith(b"4"), resp[:300]
    assert b"application/json" in headers.lower(), resp[:300]
    err = assert_error(int(status_line.split()[1]), json.loads(payload), int(status_line.split()[1]))
    assert err["code"] == "malformed_http_request"
    healthy(server)


@pytest.mark.parametrize("method,path,body", [
    ("POST", "/tokenize", {"prompt": "hi"}), ("POST", "/detokenize", {"tokens": [1, 2]}),
    ("GET", "/v1/models", None), ("POST", CMPL, {"prompt": "hi"}), ("POST", "/nowhere", {}),
])
def test_the_api_key_covers_every_route(server, method, path, body):
    assert_error(*http(server, method, path, body, auth=False), 401)
    wrong = {"Authorization": "Bearer nope"}
    assert_error(*http(server, method, path, body, auth=False, headers=wrong), 401)


def test_probes_stay_open_without_the_key(server):
    for path in ("/health", "/metrics", "/version"):
        assert http(server, "GET", path, auth=False)[0] == 200, path


def test_models_show_no_filesystem_path(server):
    status, out = http(server, "GET", "/v1/models")
    assert status == 200
    for m in out["data"]:
        assert m["id"] == MODEL_NAME and m["root"] == MODEL_NAME, m
    assert "/" not in json.dumps(out).replace("\\/", "")


def _rejections(server) -> int:
    text = http(server, "GET", "/metrics", auth=False)[1]
    m = re.search(r'^vllm:admission_rejections_total\{[^}]*reason="request_limit"[^}]*\} (\S+)$', text, re.M)
    assert m, text[-2000:]
    return int(float(m.group(1)))


@pytest.mark.parametrize("name,path,body,param,flag", [
    ("too many stop strings", CMPL, {"prompt": "x", "stop": [f"s{i}" for i in range(MAX_STOPS + 1)]}, "stop",
     "--max-stop-strings"),
    ("25000 stop strings with n=128", CHAT,
     {"messages": [{"role": "user", "content": "x"}], "n": 128, "stop": [f"s{i}" for i in range(25000)]},
     "stop", "--max-stop-strings"),
    ("a long stop string", CMPL, {"prompt": "x", "stop": "y" * (MAX_STOP_LEN + 1)}, "stop", "--max-stop-string-length"),
    ("logit_bias entries", CMPL, {"prompt": "x", "logit_bias": {str(i): 1 for i in range(1025)}}, "logit_bias",
     "--max-logit-bias"),
    ("allowed_token_ids", CMPL, {"prompt": "x", "allowed_token_ids": list(range(49153))}, "allowed_token_ids",
     "--max-token-ids"),
    ("detokenize ids", "/detokenize", {"tokens": [1] * 49153}, "tokens", "--max-token-ids"),
    ("prompts", CMPL, {"prompt": ["a"] * 1025, "max_tokens": 1}, "prompt", "--max-prompts-per-request"),
    ("prompts x n", CMPL, {"prompt": ["a"] * 9, "n": 128, "max_tokens": 1}, "prompt", "--max-prompts-per-request"),
    ("n x items", CMPL, {"prompt": "x", "n": 4, "stop_token_ids": list(range(40000))}, "n", "--max-request-items"),
])
def test_limits_are_400s_naming_the_flag(server, name, path, body, param, flag):
    before = _rejections(server)
    assert_error(*http(server, "POST", path, body), 400, param, flag)
    assert _rejections(server) == before + 1


def test_stop_strings_at_the_limit_work(server):
    stops = [f"zq{i:03d}" * (MAX_STOP_LEN // 5) for i in range(MAX_STOPS - 1)] + ["."]
    status, out = http(server, "POST", CHAT, {"messages": [{"role": "user", "content": "Say: hi. bye."}],
                                             "stop": stops, "max_tokens": 24, "n": 2, "temperature": 1, "seed": 3})
    assert status == 200, out
    for c in out["choices"]:
        assert "." not in c["message"]["content"], c


@pytest.mark.parametrize("path,field,value", [
    (CHAT, "temperature", 1e39), (CHAT, "temperature", 2.5), (CMPL, "temperature", 1e39),
    (CMPL, "repetition_penalty", 1e-30), (CMPL, "presence_penalty", 1e30), (CMPL, "logit_bias", {"5": 1e39}),
])
def test_numbers_out_of_their_finite_range_are_400(server, path, field, value):
    key = "prompt" if path == CMPL else "messages"
    body = {key: "x" if path == CMPL else [{"role": "user", "content": "x"}], field: value, "max_tokens": 2}
    assert_error(*http(server, "POST", path, body), 400, field)


def test_constraints_that_leave_no_token_are_a_clear_error(server):
    # token 2 is EOS: min_tokens bans it for 4 tokens, so nothing may be sampled
    err = assert_error(*http(server, "POST", CMPL, {"prompt": "x", "allowed_token_ids": [2], "min_tokens": 4,
                                                    "max_tokens": 8}), 400, "allowed_token_ids")
    assert "min_tokens" in err["message"]


def test_hot_sampling_stays_inside_allowed_tokens(server):
    # the largest temperature completions take; special tokens are kept in the text, so a stray
    # token 0 (<|endoftext|>) would show
    pieces = [http(server, "POST", "/detokenize", {"tokens": [t]})[1]["prompt"] for t in (260, 261)]
    status, out = http(server, "POST", CMPL, {"prompt": "x", "allowed_token_ids": [260, 261], "temperature": 100,
                                             "max_tokens": 8, "ignore_eos": True, "skip_special_tokens": False})
    assert status == 200, out
    assert out["usage"]["completion_tokens"] == 8
    text = out["choices"][0]["text"]
    assert re.fullmatch("(?:" + "|".join(map(re.escape, pieces)) + ")+", text), (pieces, text)


async def _victim_gaps(server, attack, max_tokens: int = 160) -> tuple[float, list]:
    """The largest gap between a stream's events while ``attack`` (a coroutine function taking the
    session) runs, and the attack's results."""
    import aiohttp

    hdr = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(headers=hdr, timeout=aiohttp.ClientTimeout(total=120)) as s:
        body = {"prompt": "Count to one hundred: 1, 2, 3,", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": True}
        async with s.post(server.url + CMPL, json=body) as r:
            assert r.status == 200
            times: list[float] = []
            attack_task = None
            async for line in r.content:
                if not line.startswith(b"data: "):
                    continue
                times.append(time.monotonic())
                if len(times) == 3:  # prefill done, decoding: start the attack
                    attack_task = asyncio.ensure_future(attack(s))
            results = await attack_task
    gaps = [b - a for a, b in zip(times[2:], times[3:])]
    return max(gaps), results


def test_slow_inputs_do_not_stall_other_streams(server):
    big = "lorem ipsum dolor sit amet " * 30000  # 810 KB
    stops = [f"{i:03d}" + "q" * (MAX_STOP_LEN - 3) for i in range(MAX_STOPS)]  # at the limits

    async def attack(s):
        async def post(path, body, auth=True):
            hdr = None if auth else {"Authorization": "Bearer wrong"}
            async with s.post(server.url + path, json=body, headers=hdr) as r:
                await r.read()
                return r.status

        return await asyncio.gather(
            post(CMPL, {"prompt": big, "max_tokens": 1}),
            post("/tokenize", {"prompt": big}),
            post("/tokenize", {"prompt": big}, auth=False),
            post("/detokenize", {"tokens": list(range(49152))}),
            post(CHAT, {"messages": [{"role": "user", "content": "hi"}], "stop": stops, "max_tokens": 4}),
            post(CMPL, {"prompt": "x", "stop": [f"s{i}" for i in range(25000)], "n": 128}),
        )

    async def nothing(s):
        return []

    # the same stream alone, before and after: on a quiet machine its steps take well under 100 ms
    # and the attack may add at most 200 ms; on a loaded one (2 shared cores, other jobs) the
    # machine's excess is allowed twice over on top of the 300 ms
    before, _ = asyncio.run(_victim_gaps(server, nothing, 48))
    worst, statuses = asyncio.run(_victim_gaps(server, attack))
    after, _ = asyncio.run(_victim_gaps(server, nothing, 48))
    assert statuses == [400, 200, 401, 200, 200, 400], statuses
    alone = max(before, after)
    allowed = 0.3 + 2 * max(0.0, alone - 0.1)
    assert worst < allowed, f"a stream waited {worst * 1000:.0f} ms between events during the attack " \
                            f"({alone * 1000:.0f} ms alone)"
    healthy(server)
