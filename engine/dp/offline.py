"""``LLM(data_parallel_size=N)``: the LLMEngine surface LLM drives (add_request / step /
abort_request), over a DPAsyncEngine that runs on an event loop in a background thread.

``step()`` returns the requests that finished since the last call (waiting a little for the first),
so ``LLM.generate`` loops over it as over LLMEngine.step; outputs are final ones only (LLM never
asks for deltas).
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
from dataclasses import replace
from typing import Any

from engine.config import EngineArgs
from engine.core.stats import EngineStats
from engine.dp.client import DPAsyncEngine
from engine.executor import ray_teardown
from engine.outputs import RequestOutput

STEP_WAIT_S = 0.05


class DPOfflineEngine:
    def __init__(self, engine_args: EngineArgs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="dp-front-end", daemon=True)
        self._thread.start()
        try:
            self.client = DPAsyncEngine(engine_args)
        except BaseException:
            self._stop_loop()
            raise
        self._call(self._start())
        self._closed = False
        # at exit this object stops the replicas (the front end's loop first, then Ray), not the
        # replica set alone: its pumps would otherwise call into Ray while it shuts down
        ray_teardown.untrack(self.client.replica_set)
        ray_teardown.track(self)
        self.tokenizer = self.client.tokenizer
        self.config = self.client.config
        self._done: "queue.Queue[tuple[str, RequestOutput | BaseException]]" = queue.Queue()
        self._unfinished: set[str] = set()
        self.num_generation_tokens = 0

    async def _start(self) -> None:
        self.client.start()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def add_request(self, request_id: str, prompt: Any, params: Any = None, priority: int = 0,
                    lora_request: Any = None, **_: Any) -> str:
        processed = self.client.input_processor.process(prompt, params)
        if lora_request is not None:
            self.client.check_lora(lora_request)
            processed = replace(processed, lora_request=lora_request)
        stream = self._call(self.client.add_request(request_id, processed, stream=False, priority=priority))
        self._unfinished.add(request_id)
        asyncio.run_coroutine_threadsafe(self._collect(stream), self._loop)
        return request_id

    async def _collect(self, stream: Any) -> None:
        try:
            self._done.put((stream.request_id, await stream.get()))
        except BaseException as e:  # noqa: BLE001 - raised by step() on the caller's thread
            self._done.put((stream.request_id, e))

    def abort_request(self, request_ids: str | list[str]) -> list[RequestOutput]:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self._loop.call_soon_threadsafe(self.client.abort, ids)
        self._unfinished.difference_update(ids)
        return []

    def has_unfinished_requests(self) -> bool:
        return bool(self._unfinished)

    def step(self) -> list[RequestOutput]:
        outs: list[RequestOutput] = []
        try:
            item = self._done.get(timeout=STEP_WAIT_S)
        except queue.Empty:
            return outs
        while True:
            rid, out = item
            if rid in self._unfinished:
                self._unfinished.discard(rid)
                if isinstance(out, BaseException):
                    raise out
                if isinstance(out, RequestOutput):  # (an embedding has no tokens)
                    self.num_generation_tokens += sum(len(c.token_ids) for c in out.outputs)
                outs.append(out)
            try:
                item = self._done.get_nowait()
            except queue.Empty:
                return outs

    def get_stats(self) -> EngineStats:
        """The replicas' stats added up, as of now."""
        self._call(self.client.refresh_stats())
        return self.client.get_stats()

    # what beam search reads (engine/entrypoints/beam_search.py)
    def tokenize_prompt(self, prompt: Any) -> tuple[str | None, list[int]]:
        return self.client.input_processor.tokenize_prompt(prompt)

    def check_prompt(self, num_tokens: int) -> None:
        self.client.input_processor.check_prompt(num_tokens)

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self.client.input_processor.eos_token_ids

    @property
    def max_model_len(self) -> int:
        return self.client.model_config.max_model_len

    def check_health(self) -> Any:
        return self._call(self.client.check_health())

    def shutdown(self) -> None:
        """Idempotent. At interpreter exit the exit hook (ray_teardown) runs this while the loop
        thread still runs; during finalization (``__del__``) that thread may be frozen, so the
        replicas are then stopped from this thread without it."""
        if self._closed:
            return
        self._closed = True
        ray_teardown.untrack(self)
        try:
            if self._thread.is_alive() and not sys.is_finalizing():
                asyncio.run_coroutine_threadsafe(self._stop_front_end(), self._loop).result(timeout=10)
        except Exception:  # noqa: BLE001 - the replicas are stopped below in any case
            pass
        finally:
            self.client.close()  # on this thread (the main one at exit): Ray is stopped where it started
            self._stop_loop()

    async def _stop_front_end(self) -> None:
        self.client.stop_front_end()

    def _stop_loop(self) -> None:
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5.0)
