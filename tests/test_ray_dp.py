"""Data parallelism on Ray (engine/dp/): one local loopback Ray cluster (4 logical CPUs) for the
module. ``LLM(data_parallel_size=2)`` equals one engine (SmolLM2's golden prompts, seeded sampling);
``python -m engine serve --data-parallel-size 2`` (attached to the module's cluster through
RAY_ADDRESS) serves the OpenAI routes with prefix-aware routing in /metrics, and a replica killed
mid-stream fails only its own request, shows as degraded in /health and comes back. Then the Ray
Serve deployment runs on the same cluster with ``serve.run`` (Serve's HTTP proxy on 127.0.0.1 and a
free port) and answers the official openai client."""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from engine import LLM, SamplingParams
from engine.errors import EngineStartupError
from tests.server.conftest import free_port, http, spawn_server, stop_server

pytestmark = pytest.mark.slow

CLUSTER_CPUS = 4
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):\n    ", "List three prime numbers"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def wait_cpus_free(ray, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU") != CLUSTER_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU") == CLUSTER_CPUS, "every replica's placement group was removed"


def test_more_replicas_than_cpus_fails_at_once(ray_cluster, tiny_model_path):
    t0 = time.monotonic()
    with pytest.raises(EngineStartupError, match=r"data_parallel_size=5 with 1 worker\(s\) per replica needs 5 CPU .* has 4"):
        LLM(str(tiny_model_path), data_parallel_size=5)
    assert time.monotonic() - t0 < 20
    wait_cpus_free(ray_cluster)


def test_smollm2_dp2_equals_dp1(ray_cluster, default_model_path):
    """The golden prompts greedy (token for token), and seeded sampling with n=2, penalties, stop
    strings and logprobs: the same as one engine, through LLM(data_parallel_size=2)."""
    from tests.golden_prompts import golden_prompt_ids

    seeded = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=11, n=2, ignore_eos=True,
                            logprobs=2, stop=["\n\n"], repetition_penalty=1.1)
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    args = dict(num_gpu_blocks_override=96, max_model_len=1024)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica runs (one CPU each)
    try:
        ref = LLM(**args)
        prompts = [{"prompt_token_ids": ids} for ids in golden_prompt_ids(ref.get_tokenizer())]
        want = [list(o.outputs[0].token_ids) for o in ref.generate(prompts, greedy, use_tqdm=False)]
        want_s = ref.generate(PROMPTS, seeded, use_tqdm=False)
        ref.shutdown()
    finally:
        torch.set_num_threads(threads)
    with LLM(data_parallel_size=2, **args) as llm:
        outs = llm.generate(prompts, greedy, use_tqdm=False, priority=[i % 2 for i in range(len(prompts))])
        got_s = llm.generate(PROMPTS, seeded, use_tqdm=False)
        stats = llm.get_stats()
        router = llm.llm_engine.client.router
        report = llm.llm_engine.check_health()
    # the same weights, kernels and batch shapes per replica as one engine: identical, not near-tie tolerant
    assert [list(o.outputs[0].token_ids) for o in outs] == want
    assert [[c.token_ids for c in o.outputs] for o in got_s] == [[c.token_ids for c in o.outputs] for o in want_s]
    assert [[c.text for c in o.outputs] for o in got_s] == [[c.text for c in o.outputs] for o in want_s]
    assert min(router.routed) >= 4, f"both replicas served: {router.routed}"
    assert stats.generation_tokens_total >= len(prompts) * 8 and stats.kv_cache.kv_blocks_total == 2 * 96
    assert report["status"] == "ok" and len({r["pid"] for r in report["replicas"]}) == 2
    wait_cpus_free(ray_cluster)


# ---- the server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dp_server(ray_cluster, tiny_model_path, tmp_path_factory, request):
    os.environ["RAY_ADDRESS"] = ray_cluster.get_runtime_context().gcs_address
    os.environ["PAGED_ENGINE_DP_MAX_RESTARTS"] = "2"
    try:
        srv = spawn_server(tmp_path_factory.mktemp("dp") / "server.log", "--model", str(tiny_model_path),
                           "--data-parallel-size", "2", "--max-model-len", "2048")  # (long streams to kill)
    finally:
        del os.environ["RAY_ADDRESS"], os.environ["PAGED_ENGINE_DP_MAX_RESTARTS"]
    yield srv
    stop_server(srv)
    wait_cpus_free(ray_cluster, 30)


def client(srv):
    from openai import OpenAI

    from tests.server.conftest import API_KEY

    return OpenAI(base_url=srv.base_url, api_key=API_KEY, max_retries=0, timeout=120)


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and (not want or want in line) and ("engine=" in line) == ("engine" in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_server_routes_streams_and_reports_per_replica(dp_server):
    from tests.server.conftest import MODEL_NAME

    c = client(dp_server)
    chat = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                     temperature=0.8, n=2, seed=5)
    assert [ch.index for ch in chat.choices] == [0, 1] and chat.usage.completion_tokens == 12
    again = c.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                      temperature=0.8, n=2, seed=5)  # (on the other replica: same seeds, same text)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in chat.choices]
    chunks = list(c.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8,
                                       temperature=0, stream=True, stream_options={"include_usage": True}))
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 8
    plain = c.completions.create(model=MODEL_NAME, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert plain.choices[0].text == "".join(ch.choices[0].text for ch in chunks if ch.choices)
    # a repeated long prefix (6 full blocks) goes to the replica that already has it
    prefix = "word " * 100
    for i in range(6):
        c.completions.create(model=MODEL_NAME, prompt=prefix + f"tail {i}", max_tokens=2, temperature=0)
    status, text = http(dp_server, "GET", "/metrics")
    assert status == 200
    hits = [metric(text, "vllm:dp_prefix_routed_requests_total", engine=str(i)) for i in range(2)]
    assert max(hits) >= 5, f"the repeated prefix went to one replica: {hits}"
    assert metric(text, "vllm:dp_prefix_routing_hit_rate") > 0
    deadline = time.monotonic() + 10  # the replicas' engine stats reach the front end about once a second
    while metric(text, "vllm:prefix_cache_hits_total") == 0 and time.monotonic() < deadline:
        time.sleep(0.5)
        _, text = http(dp_server, "GET", "/metrics")
    assert metric(text, "vllm:prefix_cache_hits_total") > 0, "and that replica's prefix cache served it"
    per = [metric(text, "vllm:generation_tokens_total", engine=str(i)) for i in range(2)]
    while not all(p > 0 for p in per) and time.monotonic() < deadline:
        time.sleep(0.5)
        _, text = http(dp_server, "GET", "/metrics")
        per = [metric(text, "vllm:generation_tokens_total", engine=str(i)) for i in range(2)]
    assert all(p > 0 for p in per) and abs(sum(per) - metric(text, "vllm:generation_tokens_total")) < 1e-6
    status, health = http(dp_server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and [r["state"] for r in health["replicas"]] == ["up", "up"]
    # bad input is still a 400 naming the field, decided by the front end
    status, err = http(dp_server, "POST", "/v1/completions", {"model": MODEL_NAME, "prompt": "x", "max_tokens": -1})
    assert status == 400 and err["error"]["param"] == "max_tokens"


def test_abort_on_client_disconnect(dp_server):
    from tests.server.conftest import MODEL_NAME

    _, before = http(dp_server, "GET", "/metrics")
    stream = client(dp_server).completions.create(model=MODEL_NAME, prompt="Count:", max_tokens=1500,
                                                  temperature=0, stream=True, extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        _, text = http(dp_server, "GET", "/metrics")
        aborted = metric(text, "vllm:num_aborted_requests_total") > metric(before, "vllm:num_aborted_requests_total")
        if aborted and metric(text, "vllm:num_requests_running") == 0:  # (replica stats: about 1 s old)
            break
        time.sleep(0.3)
    else:
        pytest.fail(f"the abandoned stream was not aborted on its replica:\n{text}")


def test_killed_replica_fails_only_its_request_and_rejoins(dp_server):
    from tests.server.conftest import MODEL_NAME

    c = client(dp_server)
    results: dict[str, object] = {}

    def run(name: str) -> None:
        text = ""
        try:
            for ch in c.completions.create(model=MODEL_NAME, prompt=f"{name}:", max_tokens=600, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True}):
                text += ch.choices[0].text if ch.choices else ""
                results[name + "_started"] = True
            results[name] = ("done", len(text))
        except Exception as e:  # noqa: BLE001 - what the client saw
            results[name] = ("error", str(e))

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while not (results.get("a_started") and results.get("b_started")) and time.monotonic() < deadline:
        time.sleep(0.05)
    _, health = http(dp_server, "GET", "/health")
    loads = {r["index"]: r["load"] for r in health["replicas"]}
    assert sorted(loads.values()) == [1, 1], f"one stream per replica: {health}"
    victim = health["replicas"][0]
    os.kill(victim["pid"], signal.SIGKILL)
    t0 = time.monotonic()
    status, health = http(dp_server, "GET", "/health")
    while health.get("status") != "degraded" and time.monotonic() - t0 < 10:
        status, health = http(dp_server, "GET", "/health")
    assert status == 200 and health["status"] == "degraded" and health["replicas"][0]["state"] in ("down", "up")
    for t in threads:
        t.join(timeout=120)
    outcomes = sorted(v[0] for k, v in results.items() if k in ("a", "b"))
    assert outcomes == ["done", "error"], results
    err = next(v[1] for k, v in results.items() if k in ("a", "b") and v[0] == "error")
    assert "data-parallel replica 0" in err and "died" in err, err
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        _, health = http(dp_server, "GET", "/health")
        if health.get("status") == "ok":
            break
        time.sleep(0.5)
    assert health["status"] == "ok" and health["replicas"][0]["restarts"] == 1, health
    assert health["replicas"][0]["pid"] != victim["pid"]
    for i in range(2):  # both serve again
        out = c.completions.create(model=MODEL_NAME, prompt=f"again {i}", max_tokens=3, temperature=0)
        assert out.choices[0].finish_reason == "length"
    _, text = http(dp_server, "GET", "/metrics")
    assert metric(text, "vllm:dp_replica_restarts_total", engine="0") == 1
    assert metric(text, "vllm:dp_replica_up", engine="0") == 1
    assert json.loads(json.dumps(health))  # the report is plain JSON


# ---- the Ray Serve deployment (engine/serve/deployment.py), on the same cluster -----------------
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "serve_config.yaml"


@pytest.fixture(scope="module")
def serve_app(ray_cluster, tiny_model_path):
    from ray import serve

    from engine.serve.deployment import build_app

    app_cfg = yaml.safe_load(CONFIG.read_text())["applications"][0]
    args = {**app_cfg["args"], "model": str(tiny_model_path), "served-model-name": "tiny",
            "num-gpu-blocks-override": 64, "max-model-len": 512}
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=app_cfg["name"], route_prefix=app_cfg["route_prefix"])
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def test_config_file_names_the_builder_and_autoscaling():
    cfg = yaml.safe_load(CONFIG.read_text())
    app = cfg["applications"][0]
    assert app["import_path"] == "engine.serve.deployment:build_app" and cfg["http_options"]["host"] == "127.0.0.1"
    dep = app["deployments"][0]
    assert dep["name"] == "OpenAIServer" and dep["autoscaling_config"]["target_ongoing_requests"] > 0
    from engine.serve.deployment import server_namespace

    ns = server_namespace(app["args"])
    assert ns.max_model_len == 2048 and ns.served_model_name == ["smollm2"] and ns.port == 0
    with pytest.raises(ValueError, match="unknown argument"):
        server_namespace({"no-such-flag": 1})
    with pytest.raises(ValueError, match="max-model-len"):
        server_namespace({"max-model-len": "many"})


def test_serve_answers_chat_and_completions(serve_app):
    from openai import OpenAI

    c = OpenAI(base_url=serve_app + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=5,
                                     temperature=0)
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 5
    comp = c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6, temperature=0)
    streamed = list(c.completions.create(model="tiny", prompt="The capital of France is", max_tokens=6,
                                         temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == comp.choices[0].text
    assert [ch.choices[0].finish_reason for ch in streamed if ch.choices][-1] == "length"
    chunks = list(c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    # errors keep OpenAI's shape through the proxy
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as e:
        c.completions.create(model="tiny", prompt="x", max_tokens=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"


def test_serve_listens_on_loopback_only(serve_app):
    import psutil

    wild, procs = [], psutil.Process().children(recursive=True)  # the local Ray this module started
    assert procs
    for p in procs:
        try:
            wild += [(p.pid, c.laddr) for c in p.net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
        except psutil.Error:
            continue
    assert wild == [], f"listening beyond loopback: {wild}"
