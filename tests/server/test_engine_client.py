"""EngineClient: the server talks to this protocol only. AsyncLLMEngine implements it, a stand-in
engine with no model serves the routes, and the server's code never reaches into an engine."""
from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from aiohttp import web

import engine as engine_pkg
from engine.config import EngineArgs
from engine.core.async_engine import AsyncLLMEngine
from engine.core.engine_client import EngineClient, ModelInfo, OutputStream
from engine.core.input_processor import InputProcessor, ProcessedInput
from engine.core.llm_engine import LLMEngine
from engine.core.request_metrics import EngineMetrics
from engine.core.stats import EngineStats
from engine.entrypoints.openai.server import build_app
from engine.entrypoints.openai.serving_engine import ServerConfig
from engine.outputs import CompletionOutput, RequestOutput
from tests.server.conftest import free_port

PACKAGE = Path(engine_pkg.__file__).parent
VOCAB = 49152  # the default model's tokenizer, which the stand-in engine uses


def test_entrypoints_do_not_reach_into_the_engine():
    pattern = re.compile(r"\b\w*engine\w*\.(engine|scheduler|executor)\b")  # engine.engine, llm_engine.scheduler
    offenders = [
        f"{path.relative_to(PACKAGE)}:{i}: {line.strip()}"
        for path in sorted((PACKAGE / "entrypoints").rglob("*.py"))
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line) and not line.startswith(("from engine.", "import engine."))  # registries may be imported
    ]
    assert offenders == []
    assert ".executor." not in (PACKAGE / "core" / "async_engine.py").read_text()


class _Stream:
    def __init__(self, request_id: str, outputs: list[RequestOutput]) -> None:
        self.request_id, self.finished, self._outputs = request_id, False, list(outputs)

    async def get(self) -> RequestOutput:
        out = self._outputs.pop(0)
        self.finished = out.finished
        return out

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()


class FakeEngine:
    """An EngineClient with no model: every request completes at once with the text "ok"."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._processor = InputProcessor(tokenizer, VOCAB, frozenset({2}))
        self.metrics = EngineMetrics()
        self.added: list[ProcessedInput] = []
        self.aborted: list[str] = []

    model_config = ModelInfo(model_path="/models/fake", max_model_len=64, vocab_size=VOCAB)
    errored = False

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def input_processor(self) -> InputProcessor:
        return self._processor

    def check_lora(self, lora_request: Any) -> None:
        raise ValueError("the stand-in engine serves no LoRA adapters")

    def lora_users(self, lora_int_id: int) -> list[str]:
        return []

    def start(self) -> None:
        pass

    async def shutdown(self, timeout: float = 30.0) -> None:
        pass

    async def add_request(self, request_id, prompt, params=None, *, stream=True, priority=0, arrival_time=None,
                          check_queue=True):
        assert isinstance(prompt, ProcessedInput) and params is None  # the server processed it already
        self.added.append(prompt)
        n = prompt.params.n
        done = [CompletionOutput(i, "ok", [7], finish_reason="stop") for i in range(n)]
        return _Stream(request_id, [RequestOutput(request_id, prompt.prompt, prompt.prompt_token_ids, done, True)])

    async def generate(self, prompt, params, request_id, *, stream=True, priority=0):
        async for out in await self.add_request(request_id, prompt, params, stream=stream, priority=priority):
            yield out

    def abort(self, request_ids) -> None:
        self.aborted += [request_ids] if isinstance(request_ids, str) else list(request_ids)

    def release_kv(self, request_ids) -> None:  # no KV cache: nothing is ever kept
        pass

    def get_stats(self) -> EngineStats:
        return EngineStats(num_running=4)

    async def check_health(self) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path))


def test_a_stand_in_engine_serves_the_routes(tokenizer):
    fake = FakeEngine(tokenizer)
    assert isinstance(fake, EngineClient)

    async def run():
        app = build_app(fake, ServerConfig(served_model_names=["fake"]), tokenizer, model_root="/models/fake")
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                assert (await http.get(url + "/health")).status == 200
                models = await (await http.get(url + "/v1/models")).json()
                assert models["data"][0]["max_model_len"] == 64 and models["data"][0]["root"] == "/models/fake"
                r = await http.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 3, "n": 2})
                body = await r.json()
                assert r.status == 200, body
                assert [c["text"] for c in body["choices"]] == ["ok", "ok"]
                assert fake.added[-1].prompt_token_ids == [5, 6] and fake.added[-1].params.max_tokens == 3
                # the InputProcessor checks against the stand-in's vocabulary
                r = await http.post(url + "/v1/completions", json={"prompt": [5, VOCAB]})
                err = (await r.json())["error"]
                assert r.status == 400 and err["param"] == "prompt", err
                r = await http.post(url + "/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                          "allowed_token_ids": [999, VOCAB]})
                err = (await r.json())["error"]
                assert r.status == 400 and err["param"] == "allowed_token_ids", err
                r = await http.post(url + "/v1/completions", json={"prompt": "x " * 80})  # > max_model_len 64
                assert r.status == 400 and (await r.json())["error"]["code"] == "context_length_exceeded"
                text = await (await http.get(url + "/metrics")).text()
                assert 'vllm:num_requests_running{model_name="fake"} 4' in text
        finally:
            await runner.cleanup()

    asyncio.run(run())
    assert len(fake.added) == 1  # rejected requests never reached the engine


def test_async_engine_is_an_engine_client(tiny_model_path):
    # 8 blocks of 16 tokens: the KV cache, not max_model_len=256, bounds a sequence
    args = EngineArgs(model=str(tiny_model_path), max_model_len=256, num_gpu_blocks_override=8, block_size=16)
    llm_engine = LLMEngine.from_engine_args(args)
    engine = AsyncLLMEngine(llm_engine, log_stats=False)
    assert isinstance(engine, EngineClient)
    info = engine.model_config
    assert info == ModelInfo(model_path=str(llm_engine.config.model.path), max_model_len=128,
                             vocab_size=llm_engine.config.model.vocab_size)
    assert engine.get_tokenizer() is engine.tokenizer is llm_engine.tokenizer
    assert engine.input_processor is llm_engine.input_processor
    assert isinstance(engine.get_stats(), EngineStats)

    calls = []
    llm_engine.executor.check_health = lambda: calls.append(1)

    async def run():
        engine.start()
        outs = [o async for o in engine.generate([5, 6, 7], None, "g", stream=True)]
        assert outs[-1].finished and outs[-1].outputs[0].token_ids
        await engine.check_health()
        assert calls == [1]  # through LLMEngine.check_health

        def dead() -> None:
            raise RuntimeError("worker 0 is gone")

        llm_engine.executor.check_health = dead
        with pytest.raises(RuntimeError, match="worker 0"):
            await engine.check_health()
        stream = await engine.add_request("s", {"prompt_token_ids": [9, 9]})
        assert isinstance(stream, OutputStream)
        async for _ in stream:
            pass
        for _ in range(100):  # the stats snapshot is refreshed after the step
            if engine.get_stats().generation_tokens_total >= 2:
                break
            await asyncio.sleep(0.05)
        assert engine.get_stats().generation_tokens_total >= 2
        await engine.shutdown()

    asyncio.run(run())
