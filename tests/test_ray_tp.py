"""Tensor parallelism on Ray actors (CPU, gloo), one local loopback Ray cluster for the module.

Order matters and is the file's order: start-up failures, then SmolLM2 (its own engine), then the
tiny model's shared engine, whose worker the last test kills.
"""
from __future__ import annotations

import asyncio
import os
import pickle
import signal
import subprocess
import time

import pytest

from engine import LLM, SamplingParams
from engine.errors import EngineDeadError, EngineStartupError
from tests.conftest import assert_greedy_match

pytestmark = pytest.mark.slow

CLUSTER_CPUS = 4  # logical CPUs: room for two TP=2 engines at once (on 2 cores)
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):\n    ", "List three prime numbers"]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    assert os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"
    ray.init(num_cpus=CLUSTER_CPUS, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def greedy_with_gaps(llm: LLM, prompts, max_tokens: int) -> list[dict]:
    """Greedy tokens and each step's top-2 logprob gap (= logit gap): the reference for
    ``assert_greedy_match``."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2)
    refs = []
    for out in llm.generate(prompts, params, use_tqdm=False):
        c = out.outputs[0]
        gaps = []
        for lp in c.logprobs:
            top = sorted((x.logprob for x in lp.values()), reverse=True)
            gaps.append(top[0] - top[1])
        refs.append({"tokens": list(c.token_ids), "gaps": gaps})
    return refs


def compare(tp1: list[dict], outs, label: str) -> int:
    """Asserts near-tie-tolerant equality; returns how many sequences match exactly."""
    exact = 0
    for i, (ref, out) in enumerate(zip(tp1, outs)):
        got = list(out.outputs[0].token_ids)
        assert_greedy_match(got, ref, label=f"{label} prompt {i}")
        exact += got == ref["tokens"]
    return exact


def rank_param_bytes(num_layers, hidden, inter, vocab, heads, kv_heads, head_dim, tied, tp) -> int:
    """What one rank should hold: its head layout, 1/tp of the MLP and vocabulary, norms replicated."""
    from engine.distributed.head_layout import tp_head_layout

    lay = tp_head_layout(heads, kv_heads, tp, 0)
    attn = (lay.num_heads + 2 * lay.num_kv_heads) * head_dim * hidden + hidden * lay.num_heads * head_dim
    mlp = 3 * hidden * inter // tp
    vocab_rows = -(-vocab // tp)
    embed = vocab_rows * hidden * (1 if tied else 2)
    norms = (2 * num_layers + 1) * hidden
    return 4 * (num_layers * (attn + mlp) + embed + norms)


# ---- start-up failures: clear errors, no hang -----------------------------------------------------
def test_not_enough_cpus_fails_at_once(ray_cluster, tiny_model_path):
    t0 = time.monotonic()
    with pytest.raises(EngineStartupError, match=r"tensor_parallel_size=5 needs 5 CPU .* the cluster has 4"):
        LLM(str(tiny_model_path), tensor_parallel_size=5)
    assert time.monotonic() - t0 < 30
    assert ray_cluster.available_resources().get("CPU") == CLUSTER_CPUS, "nothing was left reserved"


def test_busy_cluster_times_out_instead_of_waiting_forever(ray_cluster, tiny_model_path, monkeypatch):
    from ray.util.placement_group import placement_group, remove_placement_group

    held = placement_group([{"CPU": 3}])  # another job holds three of the four CPUs
    assert held.wait(timeout_seconds=30)
    monkeypatch.setenv("PAGED_ENGINE_RAY_PLACEMENT_TIMEOUT", "2")
    try:
        t0 = time.monotonic()
        with pytest.raises(EngineStartupError, match=r"could not place 2 workers .* 1 of the cluster's 4 CPU are free"):
            LLM(str(tiny_model_path), tensor_parallel_size=2)
        assert time.monotonic() - t0 < 30
    finally:
        remove_placement_group(held)
    deadline = time.monotonic() + 10
    while ray_cluster.available_resources().get("CPU") != CLUSTER_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU") == CLUSTER_CPUS, "the failed engine's placement group was removed"


def test_pinned_port_taken_is_a_clear_error(ray_cluster, tiny_model_path, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        monkeypatch.setenv("PAGED_ENGINE_DIST_PORT", str(port))
        t0 = time.monotonic()
        with pytest.raises(EngineStartupError, match=f"rank 0 could not listen on port {port}") as info:
            LLM(str(tiny_model_path), tensor_parallel_size=2, num_gpu_blocks_override=32)
        assert type(info.value) is EngineStartupError, "the worker's error arrives as raised, not wrapped"
        assert time.monotonic() - t0 < 90
    deadline = time.monotonic() + 15
    while ray_cluster.available_resources().get("CPU") != CLUSTER_CPUS and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU") == CLUSTER_CPUS, "the workers that did start were stopped"


# ---- SmolLM2: 9 query heads / 3 KV heads on 2 ranks ------------------------------------------------
def test_smollm2_golden_prompts_tp2_equal_tp1(ray_cluster, default_model_path):
    from transformers import AutoTokenizer

    from tests.golden_prompts import golden_prompt_ids

    prompts = [{"prompt_token_ids": p} for p in golden_prompt_ids(AutoTokenizer.from_pretrained(default_model_path))]
    kw = dict(enable_prefix_caching=False, num_gpu_blocks_override=128, max_model_len=1024)
    tp1 = LLM(**kw)
    ref = greedy_with_gaps(tp1, prompts, 16)
    full_bytes = tp1.llm_engine.executor.collective_rpc("weight_bytes")[0]
    tp1.shutdown()
    del tp1
    llm = LLM(tensor_parallel_size=2, **kw)
    try:
        outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True), use_tqdm=False)
        exact = compare(ref, outs, "SmolLM2 TP=2")
        print(f"SmolLM2 TP=2: {exact}/{len(prompts)} golden prompts token-identical to TP=1")
        per_rank = llm.llm_engine.executor.weight_bytes()
    finally:
        llm.shutdown()
    # 30 layers, hidden 576, inter 1536, vocab 49152, 9/3 heads of 64, tied embeddings
    want = rank_param_bytes(30, 576, 1536, 49152, 9, 3, 64, True, 2)
    assert per_rank == [want, want]
    assert full_bytes == 538060032 and per_rank[0] < 0.55 * full_bytes, (per_rank, full_bytes)


# ---- the tiny model: sizes that divide evenly --------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tp2(ray_cluster, tiny_model_path):
    llm = LLM(str(tiny_model_path), tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20)
    yield llm
    llm.shutdown()


def test_tiny_tp2_equals_tp1(tiny_tp2, tiny_model_path):
    tp1 = LLM(str(tiny_model_path), kv_cache_memory_bytes=1 << 20)
    ref = greedy_with_gaps(tp1, PROMPTS, 24)
    outs = tiny_tp2.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    assert compare(ref, outs, "tiny TP=2") == len(PROMPTS)
    # seeded sampling is reproducible across executors too (every rank sees the same gathered logits)
    seeded = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=7)
    a = [o.outputs[0].token_ids for o in tp1.generate(PROMPTS, seeded, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in tiny_tp2.generate(PROMPTS, seeded, use_tqdm=False)]
    assert a == b


def test_structured_outputs_under_tp2_equal_tp1(tiny_tp2, tiny_model_path):
    """The step's grammar bitmask reaches every rank: constrained greedy output under TP=2 equals
    TP=1 (a divergence only right after a near-tie of the masked distribution's top two, whose
    logprobs are the processed ones) and full-matches the constraint."""
    import json
    import re

    from engine.structured_output.params import StructuredOutputsParams as SO

    schema = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "minItems": 2, "maxItems": 4}
    sos = [SO(json=schema, disable_any_whitespace=True), SO(regex=r"(ab|cd){2,5}"), SO(choice=["left", "right"])]
    params = [SamplingParams(temperature=0.0, max_tokens=40, logprobs=2, structured_outputs=so) for so in sos]
    tp1 = LLM(str(tiny_model_path), kv_cache_memory_bytes=1 << 20)
    try:
        ref = [o.outputs[0] for o in tp1.generate(PROMPTS[:3], params, use_tqdm=False)]
    finally:
        tp1.shutdown()
    got = [o.outputs[0] for o in tiny_tp2.generate(PROMPTS[:3], params, use_tqdm=False)]
    for i, (g, r) in enumerate(zip(got, ref)):
        gaps = [(lambda top: top[0] - top[1] if len(top) > 1 else float("inf"))(
            sorted((x.logprob for x in lp.values()), reverse=True)) for lp in r.logprobs]
        assert_greedy_match(list(g.token_ids), {"tokens": list(r.token_ids), "gaps": gaps}, label=f"constraint {i}")
    arr = json.loads(got[0].text)
    assert 2 <= len(arr) <= 4 and all(isinstance(v, int) and 0 <= v <= 99 for v in arr), got[0].text
    assert re.fullmatch(r"(ab|cd){2,5}", got[1].text), got[1].text
    assert got[2].text in ("left", "right")


def test_tiny_rank_weights_and_cache_are_shards(tiny_tp2):
    ex = tiny_tp2.llm_engine.executor
    per_rank = ex.weight_bytes()
    # hidden 64, 2 layers, 4/2 heads of 16, inter 128, untied vocab 49152
    want = rank_param_bytes(2, 64, 128, 49152, 4, 2, 16, False, 2)
    assert per_rank == [want, want]
    full = rank_param_bytes(2, 64, 128, 49152, 4, 2, 16, False, 1)
    assert per_rank[0] - full / 2 == 4 * (2 * 2 + 1) * 64 / 2, "only the norms are replicated"
    # each rank caches 1 of the 2 KV heads: 2 layers x K,V x 16 tokens x 1 head x 16 dims x 4 bytes
    assert ex.kv_bytes_per_block() == 4096
    blocks = ex.collective_rpc("determine_num_blocks")
    assert tiny_tp2.llm_engine.config.cache.num_blocks == min(blocks) == (1 << 20) // 4096


def test_steps_send_only_deltas(tiny_tp2):
    engine = tiny_tp2.llm_engine
    sent = []
    original = engine.executor.execute_model

    def record(so):
        sent.append((so, len(pickle.dumps(so))))
        return original(so)

    engine.executor.execute_model = record
    try:
        long_prompt = list(range(1000, 1400))  # 400 tokens
        tiny_tp2.generate([{"prompt_token_ids": long_prompt}, "Hi"], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    finally:
        del engine.executor.execute_model
    first, rest = sent[0][0], sent[1:]
    assert {d.req_id for d in first.new_requests} and len(first.new_requests) == 2
    decode_steps = [(so, size) for so, size in rest if so.req_ids and all(n == 1 for n in so.num_scheduled_tokens)]
    assert len(decode_steps) >= 15
    for so, size in decode_steps:
        assert not so.new_requests, "known requests are never resent"
        assert all(len(c.new_block_ids) <= 1 for c in so.cached_requests)
        assert size < 2048, f"a decode step of 2 requests serialises to {size} bytes"


def test_tp2_speculation_with_a_sharded_draft_model(ray_cluster, tiny_model_path, tmp_path):
    """The draft model runs inside the workers, sharded like the target: each rank holds half of
    it, and TP=2 with drafts gives TP=1's tokens (with and without drafts)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    draft = tmp_path / "draft"
    draft.mkdir()
    for f in tiny_model_path.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, draft / f.name)
    g = torch.Generator().manual_seed(7)  # the target plus noise: it agrees part of the time
    weights = load_file(tiny_model_path / "model.safetensors")
    save_file({k: (v + 0.003 * torch.randn(v.shape, generator=g) if v.dim() == 2 else v).contiguous()
               for k, v in weights.items()}, draft / "model.safetensors", metadata={"format": "pt"})
    spec = {"method": "draft_model", "model": str(draft), "num_speculative_tokens": 3}
    prompts = PROMPTS + [{"prompt_token_ids": [11, 12, 13, 14, 15] * 6}]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    tp1 = LLM(str(tiny_model_path), kv_cache_memory_bytes=1 << 20)
    ref = greedy_with_gaps(tp1, prompts, 24)
    tp1_spec = [o.outputs[0].token_ids for o in
                LLM(str(tiny_model_path), kv_cache_memory_bytes=1 << 20, speculative_config=spec).generate(
                    prompts, params, use_tqdm=False)]
    llm = LLM(str(tiny_model_path), tensor_parallel_size=2, kv_cache_memory_bytes=1 << 20, speculative_config=spec)
    try:
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert compare(ref, outs, "TP=2 with a draft model") == len(prompts)
        assert [o.outputs[0].token_ids for o in outs] == tp1_spec
        stats = llm.get_stats()
        assert stats.spec_decoding.num_accepted_tokens > 0, stats
        assert stats.kv_cache.kv_blocks_used == 0
        # each rank: its shard of the target and its shard of the same-sized draft
        shard = rank_param_bytes(2, 64, 128, 49152, 4, 2, 16, False, 2)
        assert llm.llm_engine.executor.weight_bytes() == [2 * shard, 2 * shard]
    finally:
        llm.shutdown()


def test_two_engines_on_one_host(tiny_tp2, tiny_model_path, monkeypatch):
    """A second TP=2 engine beside the first, both answer correctly while interleaved, and the second
    one's shutdown leaves the first working. The first meets through a file store; the second through
    the multi-node TCP store with port 0, which rank 0 binds and reports (no port race)."""
    monkeypatch.setenv("PAGED_ENGINE_DIST_PORT", "0")
    other = LLM(str(tiny_model_path), tensor_parallel_size=2, num_gpu_blocks_override=64)
    monkeypatch.delenv("PAGED_ENGINE_DIST_PORT")
    try:
        assert other.llm_engine.executor._store_path is None and tiny_tp2.llm_engine.executor._store_path
        assert {w.pid for w in other.llm_engine.executor.workers}.isdisjoint(
            {w.pid for w in tiny_tp2.llm_engine.executor.workers}
        )
        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        a = [o.outputs[0].token_ids for o in tiny_tp2.generate(PROMPTS, params, use_tqdm=False)]
        b = [o.outputs[0].token_ids for o in other.generate(PROMPTS, params, use_tqdm=False)]
        assert a == b
        # a worker of the idle second engine dies: its health check says so within seconds, without a step
        executor = other.llm_engine.executor
        executor.check_health()
        os.kill(executor.workers[1].pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                executor.check_health()
            except EngineDeadError as e:
                assert "rank 1" in str(e) and "died" in str(e), e
                break
            time.sleep(0.1)
        else:
            pytest.fail("a worker that died while idle was not noticed within 10 s")
        with pytest.raises(EngineDeadError):
            other.generate("x", params, use_tqdm=False)
    finally:
        t0 = time.monotonic()
        other.shutdown()
        assert time.monotonic() - t0 < 30
    again = [o.outputs[0].token_ids for o in tiny_tp2.generate(PROMPTS, params, use_tqdm=False)]
    assert again == a


def test_ray_listens_on_loopback_only(tiny_tp2, ray_cluster):
    import psutil

    node = ray_cluster._private.worker._global_node
    roots = {p.process.pid for procs in node.all_processes.values() for p in procs if p.process}
    pids = set(roots) | {os.getpid()} | {w.pid for w in tiny_tp2.llm_engine.executor.workers}
    for pid in list(roots):
        try:
            pids |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            pass
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=10).stdout
    ours = [line for line in out.splitlines() if any(f"pid={p}," in line for p in pids)]
    assert len(ours) >= 3, f"expected Ray's listeners among {len(pids)} processes:\n{out}"
    for line in ours:
        local = line.split()[3]
        assert local.startswith(("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")), f"not loopback: {line}"


def test_worker_killed_mid_generation(tiny_tp2):
    """SIGKILL one rank while a stream is running: the stream fails with EngineDeadError within
    seconds, /health answers 503, and shutting down takes bounded time and leaves nothing behind."""
    import psutil
    from aiohttp.test_utils import TestClient, TestServer

    from engine.core.async_engine import AsyncLLMEngine
    from engine.entrypoints.openai.server import build_app
    from engine.entrypoints.openai.serving_engine import ServerConfig

    engine = tiny_tp2.llm_engine
    workers = list(engine.executor.workers)
    ray = engine.executor.ray

    async def scenario() -> dict:
        aengine = AsyncLLMEngine(engine, log_stats=False)
        app = build_app(aengine, ServerConfig(served_model_names=["tiny"]), engine.tokenizer)
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        result = {}
        try:
            assert (await client.get("/health")).status == 200
            params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)
            stream = aengine.generate("Hello, my name is", params, "victim")
            got = 0
            async for _ in stream:
                got += 1
                if got == 3:  # mid-generation
                    os.kill(workers[1].pid, signal.SIGKILL)
                    result["killed_at"] = time.monotonic()
            result["error"] = None
        except EngineDeadError as e:
            result["error"] = e
            result["failed_after"] = time.monotonic() - result["killed_at"]
        try:
            resp = await asyncio.wait_for(client.get("/health"), 10)
            result["health"] = resp.status
            result["health_body"] = await resp.json()
            with pytest.raises(EngineDeadError):  # new requests are refused at once
                await asyncio.wait_for(aengine.add_request("late", "x", SamplingParams(max_tokens=2)), 5)
        finally:
            t0 = time.monotonic()
            await asyncio.wait_for(client.close(), 30)  # on_cleanup shuts the engine down
            result["shutdown_s"] = time.monotonic() - t0
        return result

    r = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert isinstance(r["error"], EngineDeadError), r
    assert "tensor-parallel worker rank" in str(r["error"]), r["error"]
    assert r["failed_after"] < 10, r
    assert r["health"] == 503 and r["health_body"]["error"]["code"] == "engine_dead", r
    assert r["shutdown_s"] < 30, r
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (
        psutil.pid_exists(workers[0].pid) or ray.available_resources().get("CPU") != CLUSTER_CPUS
    ):
        time.sleep(0.2)
    assert not psutil.pid_exists(workers[0].pid), "the surviving rank was stopped"
    assert ray.available_resources().get("CPU") == CLUSTER_CPUS, "the placement group was released"
    with pytest.raises(EngineDeadError):
        engine.executor.execute_model(None)

