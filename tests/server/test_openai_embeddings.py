"""POST /v1/embeddings against a real server, through the official openai client: float and
base64, every input shape, usage, and 400s naming the field."""
from __future__ import annotations

import base64

import numpy as np
import pytest

from tests.golden_prompts import PLAIN_PROMPTS
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, http

TEXTS = ["Hello, my name is", "The capital of France is", PLAIN_PROMPTS[3]]


@pytest.fixture(scope="module")
def reference(reference_llm):
    return {t: np.array(o.outputs.embedding, dtype=np.float32)
            for t, o in zip(TEXTS, reference_llm.embed(TEXTS, use_tqdm=False))}


def test_float_and_base64_match_offline(server, client, reference, reference_llm):
    res = client.embeddings.create(model=MODEL_NAME, input=TEXTS, encoding_format="float")
    assert res.object == "list" and res.model == MODEL_NAME and [d.index for d in res.data] == [0, 1, 2]
    tok = reference_llm.get_tokenizer()
    n = sum(len(tok.encode(t)) for t in TEXTS)
    assert res.usage.prompt_tokens == n and res.usage.total_tokens == n
    for t, d in zip(TEXTS, res.data):
        assert d.object == "embedding" and len(d.embedding) == 576
        np.testing.assert_allclose(np.array(d.embedding, dtype=np.float32), reference[t], atol=1e-5)
    # without encoding_format the client asks for base64 and decodes little-endian float32 itself
    default = client.embeddings.create(model=MODEL_NAME, input=TEXTS)
    for t, d in zip(TEXTS, default.data):
        assert isinstance(d.embedding, list)
        np.testing.assert_allclose(np.array(d.embedding, dtype=np.float32), reference[t], atol=1e-5)
    # asked for explicitly, base64 comes back as the string
    b64 = client.embeddings.create(model=MODEL_NAME, input=TEXTS[:1], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
    np.testing.assert_allclose(decoded, reference[TEXTS[0]], atol=1e-5)
    status, raw = http(server, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": TEXTS[0]})
    assert status == 200 and isinstance(raw["data"][0]["embedding"], list)  # the server's default: float


def test_token_id_inputs(client, reference, reference_llm):
    tok = reference_llm.get_tokenizer()
    ids = [tok.encode(t) for t in TEXTS]
    one = client.embeddings.create(model=MODEL_NAME, input=ids[0])
    np.testing.assert_allclose(np.array(one.data[0].embedding, dtype=np.float32), reference[TEXTS[0]], atol=1e-5)
    many = client.embeddings.create(model=MODEL_NAME, input=ids)
    for t, d in zip(TEXTS, many.data):
        np.testing.assert_allclose(np.array(d.embedding, dtype=np.float32), reference[t], atol=1e-5)
    assert many.usage.prompt_tokens == sum(len(x) for x in ids)
    single = client.embeddings.create(model=MODEL_NAME, input=TEXTS[1])
    assert len(single.data) == 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": ""}, "input"),
        ({"input": [[]]}, "input"),
        ({"input": 5}, "input"),
        ({"input": [1, 2, 10**7]}, "input"),
        ({"input": [3] * (MAX_MODEL_LEN + 1)}, "input"),
        ({"input": "hi", "dimensions": 32}, "dimensions"),
        ({"input": "hi", "dimensions": 0}, "dimensions"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({}, "input"),
    ],
)
def test_bad_input_is_400_naming_the_field(server, body, param):
    status, out = http(server, "POST", "/v1/embeddings", {"model": MODEL_NAME, **body})
    assert status == 400, out
    assert out["error"]["param"] == param, out
    assert out["error"]["message"]


def test_over_context_has_openai_code(server):
    status, out = http(server, "POST", "/v1/embeddings", {"model": MODEL_NAME, "input": [3] * (MAX_MODEL_LEN + 5)})
    assert status == 400 and out["error"]["code"] == "context_length_exceeded", out


def test_unknown_model_is_404(server):
    status, out = http(server, "POST", "/v1/embeddings", {"model": "nope", "input": "hi"})
    assert status == 404 and out["error"]["param"] == "model"


def test_all_blocks_free_after_embeddings(server, client):
    """Pooling requests give every KV block back: /metrics reports no block in use once idle."""
    import time

    client.embeddings.create(model=MODEL_NAME, input=TEXTS * 3)
    deadline = time.monotonic() + 10
    used = None
    while time.monotonic() < deadline:
        status, text = http(server, "GET", "/metrics")
        assert status == 200
        lines = [ln for ln in str(text).splitlines() if ln.startswith("vllm:kv_cache_usage_perc")]
        used = float(lines[0].split()[-1]) if lines else None
        if used == 0.0:
            break
        time.sleep(0.2)
    assert used == 0.0, used
