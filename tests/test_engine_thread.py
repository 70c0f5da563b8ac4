"""The async engine builds its LLMEngine on the thread that steps it (engine/core/async_engine.py):
the server calls it from its main thread, and an engine built there and stepped on the loop thread
ran two OpenMP thread teams, so libgomp stopped spin-waiting (served decode steps 30 ms, not 19).
It also records the decode replays of up to 64 requests before it serves."""
from __future__ import annotations

import asyncio
import os
import threading

from engine.config import EngineArgs
from engine.core.async_engine import AsyncLLMEngine
from engine.sampling_params import SamplingParams
from engine.worker.worker import Worker

PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
WORKER_CALLS = ("init_device", "load_model", "init_cache", "record_decode_plans", "execute_model", "shutdown")


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_engine_is_built_and_stepped_on_one_thread(tiny_model_path, monkeypatch):
    seen: dict[str, set[int]] = {}
    for name in WORKER_CALLS:
        method = getattr(Worker, name)

        def record(self, *args, _name=name, _method=method, **kwargs):
            seen.setdefault(_name, set()).add(threading.get_ident())
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(Worker, name, record)
    args = EngineArgs(model=str(tiny_model_path), dtype="float32", num_gpu_blocks_override=64)
    engine = AsyncLLMEngine.from_engine_args(args, log_stats=False)
    plans = engine.engine.executor.worker.runner.graph_runner.plans
    recorded = {size for size, plan in plans.items() if plan is not None}
    assert recorded == {1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64}  # before any request

    async def generate(i: int) -> list[int]:
        prompt = {"prompt_token_ids": list(range(5 + i, 40 + 2 * i))}
        last = None
        async for out in engine.generate(prompt, PARAMS, f"r{i}", stream=False):
            last = out
        return list(last.outputs[0].token_ids)

    async def main() -> tuple[list[list[int]], int, int]:
        first = await asyncio.gather(*(generate(i) for i in range(4)))
        threads = _os_threads()  # every pool the steps use exists by now
        again = await asyncio.gather(*(generate(i) for i in range(4)))
        assert again == first
        after = _os_threads()
        await engine.shutdown()
        return first, threads, after

    outputs, threads, after = asyncio.run(main())
    assert set(plans) == recorded  # the requests' steps recorded nothing more
    assert all(len(o) == 8 for o in outputs)
    assert after == threads  # stepping started no thread team beyond the first
    on = set().union(*seen.values())
    assert set(seen) == set(WORKER_CALLS)
    assert len(on) == 1 and threading.get_ident() not in on, seen  # all on the engine's thread
