"""AsyncLLMEngine and the server in-process on a tiny random model: steps never block the event
loop, aborts free blocks, and an engine failure fails requests in flight and marks the server unhealthy."""
from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest
from aiohttp import web

from engine.config import EngineArgs
from engine.core.async_engine import AsyncLLMEngine
from engine.core.llm_engine import LLMEngine, load_tokenizer
from engine.entrypoints.openai.serving_engine import ServerConfig
from engine.entrypoints.openai.server import build_app
from engine.errors import EngineDeadError
from engine.sampling_params import SamplingParams
from tests.server.conftest import free_port

pytestmark = pytest.mark.slow

NUM_BLOCKS = 64


def make_engine(model_path) -> AsyncLLMEngine:
    args = EngineArgs(model=str(model_path), max_model_len=256, num_gpu_blocks_override=NUM_BLOCKS)
    return AsyncLLMEngine(LLMEngine.from_engine_args(args), log_stats=False)


def used_blocks(engine: AsyncLLMEngine) -> int:
    return engine.engine.kv_cache.num_blocks - engine.engine.kv_cache.num_free_blocks


def slow_steps(engine: AsyncLLMEngine, seconds: float) -> None:
    real = engine.engine.executor.execute_model

    def slow(so):
        time.sleep(seconds)  # a long step, as on a big model
        return real(so)

    engine.engine.executor.execute_model = slow


def test_steps_do_not_block_the_loop_and_abort_frees_blocks(tiny_model_path):
    engine = make_engine(tiny_model_path)
    slow_steps(engine, 0.5)

    async def run():
        engine.start()
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.ensure_future(ticker())
        params = SamplingParams(max_tokens=200, ignore_eos=True, temperature=0)
        stream = await engine.add_request("a", {"prompt_token_ids": list(range(10, 50))}, params, stream=True)
        other = await engine.add_request(
            "b", {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=3, temperature=0), stream=False
        )
        first = await asyncio.wait_for(stream.get(), 30)
        assert first.outputs[0].token_ids and not first.finished
        assert used_blocks(engine) > 0
        engine.abort("a")
        last = first
        while not last.finished:
            last = await asyncio.wait_for(stream.get(), 30)
        assert last.outputs[0].finish_reason == "abort"
        done = await asyncio.wait_for(other.get(), 30)  # the other request is unaffected
        assert done.finished and len(done.outputs[0].token_ids) == 3
        stop.set()
        await tick
        for _ in range(100):  # the stats snapshot is refreshed after the abort is applied
            if engine.get_stats().kv_cache.kv_blocks_used == 0:
                break
            await asyncio.sleep(0.05)
        await engine.shutdown()
        return gaps

    gaps = asyncio.run(run())
    assert used_blocks(engine) == 0
    assert engine.metrics.finished["abort"] == 1 and engine.metrics.finished["length"] == 1
    # each step held the engine thread for 0.5 s; the event loop never waited for one (the margin
    # is for a loaded CI machine)
    assert max(gaps) < 0.3, max(gaps)


async def _serve(engine: AsyncLLMEngine, tokenizer) -> tuple[web.AppRunner, str]:
    app = build_app(engine, ServerConfig(served_model_names=["tiny"]), tokenizer)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}"


def test_engine_failure_fails_requests_and_marks_server_unhealthy(tiny_model_path):
    engine = make_engine(tiny_model_path)
    tokenizer = load_tokenizer(engine.engine.config)
    real = engine.engine.executor.execute_model
    calls = {"n": 0}

    def dying(so):
        calls["n"] += 1
        if calls["n"] > 4:
            raise RuntimeError("worker 1 died")
        time.sleep(0.05)
        return real(so)

    engine.engine.executor.execute_model = dying

    async def run():
        runner, url = await _serve(engine, tokenizer)
        try:
            async with aiohttp.ClientSession() as http, openai.AsyncOpenAI(
                base_url=url + "/v1", api_key="x", max_retries=0, timeout=60
            ) as client:
                assert (await http.get(url + "/health")).status == 200

                async def streaming():
                    stream = await client.chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=100, stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    chunks = 0
                    with pytest.raises(openai.APIError) as e:
                        async for _ in stream:
                            chunks += 1
                    return chunks, str(e.value)

                async def blocking():
                    with pytest.raises(openai.InternalServerError) as e:
                        await client.completions.create(model="tiny", prompt="hello", max_tokens=100,
                                                        extra_body={"ignore_eos": True})
                    return e.value.body

                (chunks, stream_err), body = await asyncio.wait_for(asyncio.gather(streaming(), blocking()), 60)
                assert chunks >= 1 and "worker 1 died" in stream_err
                assert body["code"] == "engine_dead" and "worker 1 died" in body["message"]

                r = await http.get(url + "/health")
                assert r.status == 503 and (await r.json())["error"]["code"] == "engine_dead"
                with pytest.raises(openai.APIStatusError) as e:
                    await client.completions.create(model="tiny", prompt="again", max_tokens=2)
                assert e.value.status_code == 503
                metrics = await (await http.get(url + "/metrics")).text()
                assert 'vllm:engine_healthy{model_name="tiny"} 0' in metrics
                assert 'vllm:num_failed_requests_total{model_name="tiny"} 2' in metrics
        finally:
            await runner.cleanup()

    asyncio.run(run())
    assert engine.errored and isinstance(engine.dead_error, EngineDeadError)
    assert used_blocks(engine) == 0  # the dead engine's requests gave their blocks back


def test_shutdown_fails_in_flight_requests_and_refuses_new_ones(tiny_model_path):
    engine = make_engine(tiny_model_path)
    slow_steps(engine, 0.05)

    async def run():
        engine.start()
        stream = await engine.add_request("s", {"prompt_token_ids": [3, 4, 5]},
                                          SamplingParams(max_tokens=200, ignore_eos=True), stream=True)
        await asyncio.wait_for(stream.get(), 30)
        await asyncio.wait_for(engine.shutdown(), 30)
        with pytest.raises(EngineDeadError):
            for _ in range(201):  # at most 200 outputs can precede the error
                await asyncio.wait_for(stream.get(), 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(engine.add_request("t", {"prompt_token_ids": [3]}, SamplingParams()), 5)
        with pytest.raises(EngineDeadError):
            await engine.check_health()

    asyncio.run(run())
    assert used_blocks(engine) == 0
