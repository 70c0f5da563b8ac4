"""DPAsyncEngine: the EngineClient of ``data_parallel_size > 1``: requests are checked here, routed to
one of N engine replicas (Ray actors, engine/dp/replica.py) and their outputs streamed back, so the
server (and ``LLM``, through engine/dp/offline.py) serves N replicas as it serves one engine.

Routing (engine/dp/router.py): least outstanding sequences, preferring a replica already sent the
request's leading full blocks. Failure: a replica whose actor dies leaves the rotation at once. Its
requests that had delivered nothing to the caller yet are sent to another replica (once); the others
fail with ReplicaFailedError (an EngineDeadError: a 503 before a response started, an error event
in a stream). Ray restarts the actor (``max_restarts``); once it has loaded its engine again it
rejoins, with an empty prefix record.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from engine.config import EngineArgs
from engine.core.async_engine import RequestStream
from engine.core.engine_client import EngineClient, ModelInfo, QueueFullError
from engine.core.input_processor import InputProcessor, ProcessedInput, PromptType
from engine.core.request_metrics import EngineMetrics
from engine.core.stats import EngineStats
from engine.dp.launch import ReplicaHandle, ReplicaSet, start_replicas
from engine.dp.replica import ReplicaRequestError
from engine.dp.router import PrefixAwareRouter
from engine.dp.stats import sum_stats
from engine.errors import EngineDeadError, PromptTooLongError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

POLL_S = 1.0  # a replica's long poll returns at least this often (stats are refreshed then)
STATS_S = 1.0


class ReplicaFailedError(EngineDeadError):
    """The replica serving this request died after part of the output had been delivered."""


@dataclass
class _Routed:
    """A request in flight, as the front end tracks it."""

    request_id: str
    processed: ProcessedInput
    stream: RequestStream
    want_deltas: bool
    priority: int
    arrival_time: float
    num_seqs: int
    replica: int = -1
    delivered: bool = False  # something reached the caller: no more retry elsewhere
    retries: int = 0
    num_tokens: int = 0
    last_token_time: float | None = None


@dataclass(frozen=True)
class _PromptLimits:
    """The replicas' admission check (the smallest replica's limits), run before routing."""

    max_model_len: int
    num_blocks: int
    block_size: int

    def __call__(self, num_tokens: int) -> None:
        if num_tokens == 0:
            raise ValueError("the prompt is empty: give at least one token")
        if num_tokens > self.max_model_len:
            raise PromptTooLongError(f"the prompt has {num_tokens} tokens, more than max_model_len="
                                     f"{self.max_model_len}; shorten it or raise max_model_len")
        if -(-num_tokens // self.block_size) > self.num_blocks:
            raise PromptTooLongError(
                f"the prompt needs {-(-num_tokens // self.block_size)} KV blocks but the cache has only "
                f"{self.num_blocks}; shorten it or give the KV cache more memory (kv_cache_memory_bytes / "
                "num_gpu_blocks_override)")


class DPAsyncEngine(EngineClient):
    def __init__(self, engine_args: EngineArgs, max_num_queued_requests: int | None = None, **_: Any) -> None:
        """Starts the replicas (blocking until each has loaded its engine). ``log_stats`` and the
        other AsyncLLMEngine options are accepted and ignored: the replicas do not log throughput."""
        from engine.core.llm_engine import load_tokenizer

        config = engine_args.create_engine_config()
        self.config = config
        self._tokenizer = load_tokenizer(config)
        self.replica_set: ReplicaSet = start_replicas(engine_args, config)
        try:
            self._init_front_end(config, max_num_queued_requests)
        except BaseException:
            self.replica_set.shutdown()
            raise

    def _init_front_end(self, config: Any, max_num_queued_requests: int | None) -> None:
        from engine.core.llm_engine import load_tokenizer
        from engine.lora.registry import LoRARegistry
        from engine.structured_output.manager import make_structured_output_manager

        self.ray = self.replica_set.ray
        self.replicas: list[ReplicaHandle] = self.replica_set.replicas
        infos = [r.info for r in self.replicas]
        limits = _PromptLimits(min(i.max_model_len for i in infos), min(i.num_blocks for i in infos),
                               infos[0].block_size)
        eos = frozenset(config.model.eos_token_ids() | ({self._tokenizer.eos_token_id} - {None}))
        self._structured = make_structured_output_manager(config, lambda: load_tokenizer(config), eos)
        self._input_processor = InputProcessor(
            self._tokenizer, config.model.vocab_size, eos, limits, structured_output=self._structured,
            pooler_config=config.pooler_config, runner=config.runner)
        self._lora = LoRARegistry(config.lora_config, config.model.hf_config)
        self._model_info = ModelInfo(str(config.model.path), limits.max_model_len, config.model.vocab_size)
        self.router = PrefixAwareRouter(len(self.replicas), limits.block_size)
        self.max_num_queued_requests = max_num_queued_requests
        self.metrics = EngineMetrics()
        self._tracked: dict[str, _Routed] = {}
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> "DPAsyncEngine":
        return cls(args, **kwargs)

    # ---- the EngineClient surface ----------------------------------------------------------
    @property
    def model_config(self) -> ModelInfo:
        return self._model_info

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def get_tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def input_processor(self) -> InputProcessor:
        return self._input_processor

    def check_lora(self, lora_request: Any) -> None:
        self._lora.check(lora_request)

    def lora_users(self, lora_int_id: int) -> list[str]:
        return [rid for rid, t in list(self._tracked.items())
                if t.processed.lora_request is not None and t.processed.lora_request.lora_int_id == lora_int_id]

    @property
    def errored(self) -> bool:
        """True once no replica can ever serve again (each is dead for good) or after shutdown."""
        return self._stopping or all(r.state == "dead" for r in self.replicas)

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._loop is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._tasks = [self._loop.create_task(self._pump(r)) for r in self.replicas]

    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._stopping:
            return
        self.stop_front_end()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def stop_front_end(self) -> None:
        """(On the event loop.) Fails the requests in flight and stops delivering; ``close`` then
        stops the replicas."""
        self._stopping = True
        err = EngineDeadError("the engine was shut down")
        for t in list(self._tracked.values()):
            t.stream.put(err)
        self._tracked.clear()
        for task in self._tasks:
            task.cancel()

    def close(self) -> None:
        """Stops every replica (any thread; also at interpreter exit)."""
        self._stopping = True
        self.replica_set.shutdown()
        self._structured.shutdown()

    def num_queued_requests(self) -> int:
        return sum(r.stats.num_waiting for r in self.replicas if r.stats is not None and r.state == "up")

    async def add_request(self, request_id: str, prompt: PromptType | ProcessedInput,
                          params: SamplingParams | None = None, *, stream: bool = True, priority: int = 0,
                          arrival_time: float | None = None, check_queue: bool = True) -> RequestStream:
        if self._loop is None:
            self.start()
        if self.errored:
            raise EngineDeadError("no data-parallel replica is alive: the engine cannot take requests")
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        processed = prompt if isinstance(prompt, ProcessedInput) else self._input_processor.process(prompt, params)
        cap = self.max_num_queued_requests if check_queue else None
        if cap is not None and self.num_queued_requests() >= cap:
            raise QueueFullError(self.num_queued_requests(), cap)
        n = getattr(processed.params, "n", 1)
        t = _Routed(request_id, processed, RequestStream(request_id), stream, priority,
                    arrival_time if arrival_time is not None else time.time(), n if isinstance(n, int) else 1)
        self._tracked[request_id] = t
        try:
            await self._place(t)
        except BaseException:
            self._tracked.pop(request_id, None)
            raise
        self.metrics.requests_added += 1
        return t.stream

    async def generate(self, prompt: PromptType | ProcessedInput, params: SamplingParams | None, request_id: str, *,
                       stream: bool = True, priority: int = 0) -> AsyncIterator[RequestOutput]:
        out = await self.add_request(request_id, prompt, params, stream=stream, priority=priority)
        try:
            async for item in out:
                yield item
        finally:
            if not out.finished:
                self.abort(request_id)

    def abort(self, request_ids: str | list[str]) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        by_replica: dict[int, list[str]] = {}
        for rid in ids:
            t = self._tracked.get(rid)
            if t is not None and t.replica >= 0:
                by_replica.setdefault(t.replica, []).append(rid)
        for i, rids in by_replica.items():
            r = self.replicas[i]
            if r.state == "up":
                r.actor.abort.remote(rids)  # the replica answers with each request's final (aborted) output

    def release_kv(self, request_ids: list[str]) -> None:
        """To every live replica: a finished request's kept blocks are on whichever ran it."""
        for r in self.replicas:
            if r.state == "up":
                r.actor.release_kv.remote(list(request_ids))

    def get_stats(self) -> EngineStats:
        """The replicas' stats added up (each as of its last refresh, about a second old at most)."""
        return sum_stats([r.stats for r in self.replicas if r.stats is not None])

    async def refresh_stats(self) -> None:
        """Fetches every live replica's stats now (``get_stats`` reads what the pumps last fetched,
        up to about a second old)."""
        up = [r for r in self.replicas if r.state == "up"]
        results = await asyncio.gather(*(r.actor.stats.remote() for r in up), return_exceptions=True)
        for r, st in zip(up, results):
            if not isinstance(st, BaseException):
                r.stats = st

    async def check_health(self) -> dict | None:
        """EngineDeadError unless some replica is up; with some down, a "degraded" report (the
        server answers it with 200 and this body)."""
        up = [r for r in self.replicas if r.state == "up"]
        report = {"status": "ok" if len(up) == len(self.replicas) else "degraded",
                  "replicas": [{"index": r.index, "state": r.state, "restarts": r.restarts, "load": r.load,
                                **({"pid": r.info.pid, "node_ip": r.info.node_ip} if r.info is not None else {}),
                                **({"error": r.last_error} if r.last_error and r.state != "up" else {})}
                               for r in self.replicas]}
        if not up:
            raise EngineDeadError("no data-parallel replica is alive: " + "; ".join(
                f"replica {r.index} {r.state}" + (f" ({r.last_error})" if r.last_error else "") for r in self.replicas))
        return report

    # ---- routing ---------------------------------------------------------------------------
    async def _place(self, t: _Routed, avoid: int | None = None) -> None:
        """Sends ``t`` to the best replica that is up (not ``avoid``); one found dead on the way is skipped."""
        tried: set[int] = set() if avoid is None else {avoid}
        lora = t.processed.lora_request
        salt = lora.lora_int_id if lora is not None else None
        while True:
            loads = {r.index: r.load for r in self.replicas if r.state == "up"}
            try:
                decision = self.router.choose(t.processed.prompt_token_ids, loads, salt, frozenset(tried))
            except LookupError:
                raise EngineDeadError("no data-parallel replica is alive to take the request "
                                      f"({sum(r.state == 'down' for r in self.replicas)} restarting)") from None
            r = self.replicas[decision.replica]
            t.replica = r.index
            r.in_flight.add(t.request_id)
            r.load += t.num_seqs
            try:
                err = await r.actor.add.remote(t.request_id, t.processed, t.want_deltas, t.priority, t.arrival_time)
            except self.ray.exceptions.RayActorError as e:
                self._release(r, t)
                self._replica_down(r, e)
                tried.add(r.index)
                continue
            if err is not None:
                self._release(r, t)
                if err.dead:
                    tried.add(r.index)
                    continue
                raise ValueError(err.message)
            self.router.record(decision)
            return

    def _release(self, r: ReplicaHandle, t: _Routed) -> None:
        if t.request_id in r.in_flight:
            r.in_flight.discard(t.request_id)
            r.load -= t.num_seqs

    async def _pump(self, r: ReplicaHandle) -> None:
        """Delivers one replica's outputs; on its death, handles its requests and waits for it to come back."""
        ray = self.ray
        last_stats = 0.0
        while not self._stopping and not self.replica_set.closed:
            if r.state != "up":
                if not await self._await_restart(r):
                    return
                continue
            try:
                batch = await r.actor.poll.remote(POLL_S)
                if time.monotonic() - last_stats > STATS_S:
                    r.stats, last_stats = await r.actor.stats.remote(), time.monotonic()
            except asyncio.CancelledError:
                raise
            except ray.exceptions.RayActorError as e:
                if self._stopping or self.replica_set.closed:
                    return
                self._replica_down(r, e)
                continue
            for rid, item in batch:
                self._deliver(r, rid, item)

    def _deliver(self, r: ReplicaHandle, rid: str, item: Any) -> None:
        t = self._tracked.get(rid)
        if t is None or t.replica != r.index:
            return
        if isinstance(item, ReplicaRequestError):
            self._release(r, t)
            if item.dead:
                self._fail_or_retry(r, t, item.message)
            else:
                self._finish(t, EngineDeadError(item.message))
            return
        now = time.time()
        n = sum(len(o.token_ids) for o in item.outputs) if isinstance(item, RequestOutput) else 0
        total = t.num_tokens + n if t.want_deltas else n
        if total > t.num_tokens:
            if t.last_token_time is None:
                self.metrics.ttft.observe(now - t.arrival_time)
            else:
                self.metrics.itl.observe(now - t.last_token_time)
            t.last_token_time, t.num_tokens = now, total
        t.delivered = True
        if item.finished:
            self._release(r, t)
            self.metrics.record_finished(item, now - t.arrival_time)
            self._tracked.pop(rid, None)
        t.stream.put(item)

    def _finish(self, t: _Routed, err: BaseException) -> None:
        self._tracked.pop(t.request_id, None)
        self.metrics.requests_failed += 1
        t.stream.put(err)

    def _fail_or_retry(self, r: ReplicaHandle, t: _Routed, why: str) -> None:
        others = any(o.state == "up" for o in self.replicas if o is not r)
        if not t.delivered and t.retries == 0 and others:
            t.retries += 1
            logger.warning("request %s: %s failed before any output; sending it to another replica",
                           t.request_id, r.describe())
            asyncio.ensure_future(self._retry(t, r.index))
            return
        self._finish(t, ReplicaFailedError(
            f"{r.describe()} died while serving request {t.request_id}: {why}; the other replicas keep "
            "serving: retry the request"))

    async def _retry(self, t: _Routed, failed: int) -> None:
        try:
            await self._place(t, avoid=failed)
        except Exception as e:  # noqa: BLE001 - the caller learns through its stream
            self._finish(t, e if isinstance(e, EngineDeadError) else EngineDeadError(str(e)))

    def _replica_down(self, r: ReplicaHandle, cause: BaseException) -> None:
        """Out of rotation at once; its requests retried or failed (see the module docstring)."""
        if r.state != "up":
            return
        r.state, r.deaths = "down", r.deaths + 1
        r.last_error = f"{type(cause).__name__}: {str(cause).strip().splitlines()[0] if str(cause).strip() else ''}"[:300]
        logger.error("%s died (%s); %d request(s) in flight there", r.describe(), r.last_error, len(r.in_flight))
        self.router.forget(r.index)
        for rid in list(r.in_flight):
            t = self._tracked.get(rid)
            if t is not None:
                self._release(r, t)
                self._fail_or_retry(r, t, r.last_error)
        r.in_flight.clear()
        r.load = 0

    async def _await_restart(self, r: ReplicaHandle) -> bool:
        """Waits for Ray's restart of ``r`` (it reloads its engine); False if it will not come back."""
        from engine.executor.ray_utils import startup_timeout_s

        if r.state == "dead":
            return False
        if r.deaths > self.replica_set.max_restarts:
            r.state = "dead"
            return False
        deadline = time.monotonic() + startup_timeout_s()
        while not self._stopping and not self.replica_set.closed and time.monotonic() < deadline:
            try:
                r.info = await r.actor.info.remote()
            except asyncio.CancelledError:
                raise
            except self.ray.exceptions.RayActorError:
                await asyncio.sleep(0.5)  # still restarting (or gone for good: the deadline decides)
                continue
            except self.ray.exceptions.RayTaskError as e:  # its new engine failed to load
                r.last_error = f"restart failed: {str(e).strip().splitlines()[-1]}"[:300]
                break
            r.state, r.restarts, r.last_error = "up", r.restarts + 1, None
            logger.info("%s is back (restart %d)", r.describe(), r.restarts)
            return True
        r.state = "dead"
        return False
