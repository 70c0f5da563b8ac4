"""Health, Prometheus metrics, throughput logging and client disconnects on a real server process."""
from __future__ import annotations

import json
import re
import socket
import time

import pytest

from tests.server.conftest import API_KEY, MODEL_NAME, NUM_BLOCKS, http, tokenize
from tests.server.golden_metrics import METRIC_FAMILIES

pytestmark = pytest.mark.slow

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.e+-]+|\+Inf|NaN)$')


def scrape(server) -> dict[str, float]:
    """/metrics as {name{labels}: value}, checking every line is valid exposition format."""
    status, text = http(server, "GET", "/metrics", auth=False)
    assert status == 200 and isinstance(text, str)
    out = {}
    for line in text.splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+$", line), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"bad metrics line: {line!r}"
        out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    want = {"model_name": MODEL_NAME, **labels}
    key = name + "{" + ",".join(f'{k}="{v}"' for k, v in want.items()) + "}"
    assert key in samples, f"{key} missing from /metrics: {sorted(samples)[:40]}"
    return samples[key]


def wait_for(server, cond, timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(server)
        if cond(samples):
            return samples
        assert time.monotonic() < deadline, f"condition not met in {timeout} s; last scrape: {samples}"
        time.sleep(0.1)


def idle(samples: dict[str, float]) -> bool:
    return (metric(samples, "vllm:num_requests_running") == 0 and metric(samples, "vllm:num_requests_waiting") == 0
            and metric(samples, "vllm:kv_cache_blocks_used") == 0)


def test_health_and_version(server):
    assert http(server, "GET", "/health", auth=False)[0] == 200
    status, v = http(server, "GET", "/version", auth=False)
    assert status == 200 and v["version"]


def test_metrics_counters_and_histograms(server, client):
    prompt = "Metrics probe: the quick brown fox"
    n_prompt = len(tokenize(server, prompt))
    before = wait_for(server, idle)
    client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=9, temperature=0,
                              extra_body={"ignore_eos": True})
    after = wait_for(server, idle)
    assert metric(after, "vllm:generation_tokens_total") - metric(before, "vllm:generation_tokens_total") == 9
    assert metric(after, "vllm:prompt_tokens_total") - metric(before, "vllm:prompt_tokens_total") == n_prompt
    assert metric(after, "vllm:request_success_total", finished_reason="length") == \
        metric(before, "vllm:request_success_total", finished_reason="length") + 1
    for h, new in (("vllm:time_to_first_token_seconds", 1), ("vllm:inter_token_latency_seconds", 8)):
        count = metric(after, h + "_count")
        assert count - metric(before, h + "_count") == new
        assert metric(after, h + "_bucket", le="+Inf") == count
        assert metric(after, h + "_sum") > metric(before, h + "_sum")
    for name in ("vllm:kv_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
                 "vllm:engine_healthy"):
        metric(after, name)
    # a repeated prompt of several full blocks is served from the prefix cache
    long_prompt = "The history of the printing press begins " * 6
    hits0 = metric(after, "vllm:prefix_cache_hits_total")
    for _ in range(2):
        client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=1)
    assert metric(wait_for(server, idle), "vllm:prefix_cache_hits_total") >= hits0 + 16


def test_metrics_families_unchanged(server, client):
    """Typed stats left /metrics as it was: every family (name, type, HELP), in the same order."""
    client.completions.create(model=MODEL_NAME, prompt="Families", max_tokens=2)
    status, text = http(server, "GET", "/metrics", auth=False)
    assert status == 200
    helps = re.findall(r"^# HELP (\S+) (.+)$", text, re.M)
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    assert [(name, types[name], help) for name, help in helps] == [tuple(f) for f in METRIC_FAMILIES]
    samples = scrape(server)
    assert metric(samples, "vllm:kv_cache_blocks_total") == NUM_BLOCKS
    assert metric(samples, "vllm:engine_scheduler_num_steps") > 0


def _raw_post(server, path: str, body: dict) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    data = json.dumps(body).encode()
    s.sendall(
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
    )
    return s


def _hang_up(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
    s.close()


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "non-streaming"])
def test_client_hangup_aborts_and_frees_blocks(server, stream):
    before = wait_for(server, idle)
    aborted0 = metric(before, "vllm:num_aborted_requests_total")
    body = {"model": MODEL_NAME, "prompt": "Tell me a very long story about a dragon.", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": stream}
    s = _raw_post(server, "/v1/completions", body)
    try:
        if stream:
            got = b""
            for _ in range(1000):  # until headers and a few tokens arrived: the request is running
                if got.count(b"data: ") >= 3:
                    break
                part = s.recv(4096)
                assert part, "the server closed the stream early"
                got += part
            assert got.count(b"data: ") >= 3
            assert b"200 OK" in got.split(b"\r\n", 1)[0]
        else:
            wait_for(server, lambda m: metric(m, "vllm:num_requests_running") == 1 and
                     metric(m, "vllm:kv_cache_blocks_used") > 0)
    finally:
        _hang_up(s)
    t0 = time.monotonic()
    after = wait_for(server, lambda m: metric(m, "vllm:num_aborted_requests_total") == aborted0 + 1 and idle(m),
                     timeout=20)
    # 400 tokens take far longer than this: the request was aborted, not finished
    assert time.monotonic() - t0 < 10
    assert metric(after, "vllm:request_success_total", finished_reason="abort") >= 1
    status, out = http(server, "POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
    assert status == 200, out


def test_throughput_log_line(server, client):
    client.completions.create(model=MODEL_NAME, prompt="Log probe", max_tokens=40, temperature=0,
                              extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 10
    pattern = re.compile(r"Running: \d+ reqs, Waiting: \d+ reqs, KV cache usage: [\d.]+%, "
                         r"Avg prompt throughput: [\d.]+ tokens/s, Avg generation throughput: [\d.]+ tokens/s")
    while not pattern.search(server.log()):
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
