"""LoRA through the OpenAI server: --lora-modules (both forms), the adapter picked by ``model``,
/v1/models, and loading / unloading adapters at run time while other requests stream."""
from __future__ import annotations

import json
import re
import threading
import time

import pytest

from tests.conftest import make_tiny_llama
from tests.lora_utils import make_adapter, peft_greedy
from tests.server.conftest import MODEL_NAME, http, spawn_server, stop_server

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = [1, 300, 301, 302, 9000, 12, 400]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_model_path):
    d = tmp_path_factory.mktemp("lora-server")
    base = make_tiny_llama(d / "base", default_model_path)
    adapters = {
        "a1": make_adapter(base, d / "a1", r=8, targets=ALL, seed=1),
        "a2": make_adapter(base, d / "a2", r=4, targets=["q_proj", "v_proj"], seed=2),
        "a3": make_adapter(base, d / "a3", r=16, targets=["gate_proj", "down_proj"], seed=3),
        "big": make_adapter(base, d / "big", r=32, targets=["q_proj"], seed=4),
    }
    return base, adapters, d


@pytest.fixture(scope="module")
def lora_server(setup):
    base, adapters, d = setup
    srv = spawn_server(d / "server.log", "--model", str(base), "--enable-lora", "--max-loras", "2",
                       "--max-lora-rank", "16", "--allow-runtime-lora-updating", "--lora-modules",
                       f"a1={adapters['a1']}", json.dumps({"name": "a2", "path": str(adapters["a2"])}))
    try:
        yield srv
    finally:
        stop_server(srv)


def complete(srv, model: str, max_tokens: int = 8) -> tuple[int, object]:
    return http(srv, "POST", "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": max_tokens,
                                                 "temperature": 0, "ignore_eos": True, "logprobs": 0})


def assert_matches_peft(srv, base, adapter, model):
    status, body = complete(srv, model)
    assert status == 200, body
    ref = peft_greedy(base, adapter, [PROMPT], 8)[0]["tokens"]
    status, text = http(srv, "POST", "/detokenize", {"tokens": ref})
    assert body["choices"][0]["text"] == text["prompt"], (model, body["choices"][0]["text"], text)
    assert body["model"] == model


def test_models_lists_the_adapters_with_their_parent(lora_server, setup):
    _, adapters, _ = setup
    status, out = http(lora_server, "GET", "/v1/models")
    assert status == 200
    cards = {m["id"]: m for m in out["data"]}
    assert cards[MODEL_NAME]["parent"] is None
    for name in ("a1", "a2"):
        assert cards[name]["parent"] == MODEL_NAME and cards[name]["root"] == str(adapters[name])


def test_each_model_name_gets_its_adapter(lora_server, setup):
    base, adapters, _ = setup
    assert_matches_peft(lora_server, base, adapters["a1"], "a1")
    assert_matches_peft(lora_server, base, adapters["a2"], "a2")
    assert_matches_peft(lora_server, base, None, MODEL_NAME)
    status, body = http(lora_server, "POST", "/v1/chat/completions",
                        {"model": "a1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert status == 200 and body["model"] == "a1", body
    status, body = complete(lora_server, "nope")
    assert status == 404 and body["error"]["message"] == "The model `nope` does not exist.", body


def test_load_and_unload_while_streaming(lora_server, setup):
    base, adapters, _ = setup
    srv = lora_server
    events: list[str] = []

    def stream() -> None:
        import urllib.request

        req = urllib.request.Request(
            srv.url + "/v1/completions",
            data=json.dumps({"model": "a1", "prompt": PROMPT, "max_tokens": 500, "temperature": 0,
                             "ignore_eos": True, "stream": True}).encode(),
            headers={"Content-Type": "application/json", "Authorization": "Bearer test-key-123"})
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                if line.startswith(b"data: "):
                    events.append(line[6:].strip().decode())

    t = threading.Thread(target=stream)
    t.start()
    try:
        for _ in range(400):  # bounded wait for the stream to start
            if events:
                break
            time.sleep(0.05)
        assert events, "the stream did not start"
        status, body = http(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"})
        assert status == 409 and body["error"]["code"] == "lora_adapter_in_use", body
        status, body = http(srv, "POST", "/v1/load_lora_adapter", {"lora_name": "a3", "lora_path": str(adapters["a3"])})
        assert status == 200 and "a3" in body, body
        assert_matches_peft(srv, base, adapters["a3"], "a3")
        status, body = http(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "a3"})
        assert status == 200, body
        status, body = complete(srv, "a3")
        assert status == 404, body
        # bad loads: 4xx naming the problem; the server keeps serving
        bad = [({"lora_name": "big", "lora_path": str(adapters["big"])}, 400, "max_lora_rank"),
               ({"lora_name": "gone", "lora_path": "/nonexistent/adapter"}, 404, "adapter_config.json"),
               ({"lora_name": "a2", "lora_path": str(adapters["a2"])}, 400, "already been loaded"),
               ({"lora_name": "x"}, 400, "lora_path")]
        for req, code, words in bad:
            status, body = http(srv, "POST", "/v1/load_lora_adapter", req)
            assert status == code and words in body["error"]["message"], (req, status, body)
        status, body = http(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "never"})
        assert status == 404, body
        status, body = http(srv, "POST", "/v1/load_lora_adapter", {"lora_name": "a4", "lora_path": str(adapters["a2"])},
                            auth=False)
        assert status == 401, body
    finally:
        t.join(timeout=120)
    assert events[-1] == "[DONE]" and not any('"error"' in e for e in events)
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
    ref = peft_greedy(base, adapters["a1"], [PROMPT], 40)[0]["tokens"]
    status, out = http(srv, "POST", "/detokenize", {"tokens": ref})
    assert text.startswith(out["prompt"]), (text[:200], out["prompt"])
    status, body = http(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"})
    assert status == 200, body  # its request finished: now it unloads
    status, metrics = http(srv, "GET", "/metrics")
    usage = re.search(r"^vllm:kv_cache_usage_perc\S* (\S+)$", metrics, re.M)
    assert usage is not None and float(usage.group(1)) == 0.0, metrics[:2000]


def test_runtime_updating_needs_the_switch(setup):
    base, adapters, d = setup
    srv = spawn_server(d / "locked.log", "--model", str(base), "--enable-lora", "--max-lora-rank", "16")
    try:
        status, body = http(srv, "POST", "/v1/load_lora_adapter", {"lora_name": "a1", "lora_path": str(adapters["a1"])})
        assert status == 403 and "--allow-runtime-lora-updating" in body["error"]["message"], body
        assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in body["error"]["message"]
        status, body = http(srv, "POST", "/v1/unload_lora_adapter", {"lora_name": "a1"})
        assert status == 403, body
    finally:
        stop_server(srv)
