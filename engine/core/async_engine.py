"""The asynchronous engine: LLMEngine.step runs in one background thread; asyncio code adds,
streams and aborts requests without ever waiting for a step.

The engine thread owns the LLMEngine, and builds it (``from_engine_args``): every OpenMP region of
the engine (warm-up, plan recording, each step) then opens on that one thread. libgomp keeps a
team of threads per thread that opens regions; with a second team it counts more threads than
cores and stops spin-waiting at its barriers, and a served decode step took 30-33 ms instead of
19-21 when the engine was built on the main thread and stepped here. Callers on the event loop
never touch the engine directly: they queue commands (add, abort) that the thread applies between
steps, and the thread hands outputs back with ``loop.call_soon_threadsafe``. A step that raises
kills the engine: every request in flight fails with EngineDeadError and ``errored`` becomes true
(the server reports unhealthy).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from engine.config import EngineArgs
from engine.core.engine_client import EngineClient, ModelInfo, QueueFullError
from engine.core.input_processor import InputProcessor, ProcessedInput, PromptType
from engine.core.llm_engine import LLMEngine
from engine.core.request_metrics import (  # noqa: F401 - Histogram and the buckets were defined here
    E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS, EngineMetrics, Histogram,
)
from engine.core.stats import EngineStats
from engine.errors import EngineDeadError
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class RequestStream:
    """The outputs of one request, consumed on the event loop."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait(item)

    async def get(self) -> RequestOutput:
        """The next output; raises the engine's error if it died meanwhile."""
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()


@dataclass
class _Add:
    request_id: str
    prompt: PromptType | ProcessedInput
    params: SamplingParams | None
    arrival_time: float
    priority: int
    stream: bool
    out: RequestStream
    done: Callable[[BaseException | None], None]

    @property
    def num_sequences(self) -> int:
        """How many scheduler requests this adds (n samples)."""
        params = self.params if self.params is not None else getattr(self.prompt, "params", None)
        n = getattr(params, "n", 1)
        return n if isinstance(n, int) and n > 0 else 1


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _ReleaseKV:
    request_ids: list[str]


@dataclass
class _Tracked:
    """What the engine thread remembers about a request for metrics and delivery."""

    stream: RequestStream
    want_deltas: bool
    arrival_time: float
    num_tokens: int = 0
    last_token_time: float | None = None


@dataclass
class _StatLog:
    last_time: float = field(default_factory=time.monotonic)
    last_prompt_tokens: int = 0
    last_generation_tokens: int = 0


# Decode batch sizes whose kernel plans a served engine records before it is ready (SmolLM2 on 2
# cores: 56-190 ms each, 2.6 s for the 20 buckets to 64). Recorded at a first step of each size
# instead, they stalled every running request and made the p99 first token 3-4x the median.
SERVED_DECODE_PLANS = 64


def _build_engine(args: EngineArgs) -> LLMEngine:
    engine = LLMEngine.from_engine_args(args)
    t = time.perf_counter()
    sizes = engine.record_decode_plans(min(SERVED_DECODE_PLANS, engine.config.scheduler.max_num_seqs))
    if sizes:
        logger.info("recorded decode-step replays for batch sizes %s in %.1f s", sizes, time.perf_counter() - t)
    return engine


class _EngineThread(threading.Thread):
    """The engine's one thread: runs the calls handed to it, in order (building the engine, then
    the step loop, which holds it until the engine stops). A daemon, as the loop may never end."""

    def __init__(self) -> None:
        super().__init__(name="engine-step-loop", daemon=True)
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        self.start()

    def submit(self, fn: Callable, *args: Any) -> Future:
        fut: Future = Future()
        self._calls.put((fn, args, fut))
        return fut

    def call(self, fn: Callable, *args: Any) -> Any:
        return self.submit(fn, *args).result()

    def run(self) -> None:
        while True:
            fn, args, fut = self._calls.get()
            if fn is None:
                return
            try:
                fut.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)

    def stop(self) -> None:
        """Ends the thread after the calls already queued."""
        self._calls.put((None, (), None))


class AsyncLLMEngine(EngineClient):
    """The EngineClient the server talks to, around one LLMEngine."""

    def __init__(self, engine: LLMEngine, log_stats: bool = True, log_stats_interval: float = 5.0,
                 max_num_queued_requests: int | None = None, engine_thread: _EngineThread | None = None) -> None:
        self.engine = engine
        # the thread that built the engine (from_engine_args), else a new one: the step loop runs there
        self._engine_thread = engine_thread or _EngineThread()
        # back-pressure: add_request raises QueueFullError while this many sequences wait (None: no cap)
        self.max_num_queued_requests = max_num_queued_requests
        self._num_pending = 0  # sequences queued as commands, not yet in the scheduler (under _cv)
        self._num_waiting = 0  # the scheduler's waiting sequences after the last update (under _cv)
        self._free_slots = 0  # running slots (max_num_seqs) a new sequence would take at once (under _cv)
        cfg = engine.config.model
        self._model_info = ModelInfo(
            model_path=str(cfg.path),
            max_model_len=min(cfg.max_model_len, engine.scheduler.max_model_len),
            vocab_size=cfg.vocab_size,
        )
        self._input_processor = engine.input_processor  # built here, before the engine thread runs
        self.log_stats = log_stats
        self.log_stats_interval = log_stats_interval
        self.metrics = EngineMetrics()
        self._cv = threading.Condition()
        self._commands: list[_Add | _Abort] = []
        self._stopping = False
        self._shut_down = False
        self._thread: _EngineThread | None = None  # set once the step loop is handed to it
        self._loop_done: Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tracked: dict[str, _Tracked] = {}  # engine thread only
        self._dead: EngineDeadError | None = None
        self._stats = EngineStats()
        self._stats_failed = False
        self._stat_log = _StatLog()
        self._refresh_stats()
        self._update_queue_counts(0)  # before the engine thread runs: safe to read the scheduler here

    @classmethod
    def from_engine_args(cls, args: EngineArgs, **kwargs: Any) -> "AsyncLLMEngine":
        """Builds the LLMEngine on the thread that will step it (see the module docstring)."""
        thread = _EngineThread()
        try:
            engine = thread.call(_build_engine, args)
        except BaseException:
            thread.stop()
            raise
        return cls(engine, engine_thread=thread, **kwargs)

    # ---- properties ------------------------------------------------------------------------
    @property
    def model_config(self) -> ModelInfo:
        return self._model_info

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def input_processor(self) -> InputProcessor:
        return self._input_processor

    def check_lora(self, lora_request: Any) -> None:
        self.engine.check_lora(lora_request)  # reads files and the adapter registry only: any thread

    def lora_users(self, lora_int_id: int) -> list[str]:
        return self.engine.lora_users(lora_int_id)

    @property
    def errored(self) -> bool:
        return self._dead is not None

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    @property
    def is_running(self) -> bool:
        return self._loop_running() and not self.errored

    def _loop_running(self) -> bool:
        return self._loop_done is not None and not self._loop_done.done()

    def get_stats(self) -> EngineStats:
        """The engine's stats as of the end of its last step (safe to call from any thread: the
        snapshot is never changed, a new one replaces it)."""
        return self._stats

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        if self._thread is not None:
            return
        self._loop = loop or asyncio.get_running_loop()
        self._thread = self._engine_thread
        self._loop_done = self._thread.submit(self._run)

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Fails what is in flight (EngineDeadError), stops the engine thread (waiting at most
        ``timeout`` s for a step to end) and shuts the executor down (Ray workers included)."""
        with self._cv:
            if self._shut_down:
                return
            self._shut_down = self._stopping = True
            self._cv.notify()
        loop = asyncio.get_running_loop()
        if self._loop_running():
            await loop.run_in_executor(None, concurrent.futures.wait, [self._loop_done], timeout)
            if self._loop_running():  # in a long step: fail its requests from here
                logger.warning("the engine thread did not stop within %.1f s; failing its %d request(s) now",
                               timeout, len(self._tracked))
                self._fail_from_loop(EngineDeadError("the engine was shut down"))
        # off the event loop: stopping Ray workers takes a second or two, while handlers write final
        # events; on the engine's thread when its loop has ended, else (a step still running) beside it
        if self._loop_running():
            await loop.run_in_executor(None, self.engine.shutdown)
        else:
            await asyncio.wrap_future(self._engine_thread.submit(self.engine.shutdown))
        self._engine_thread.stop()

    def _fail_from_loop(self, err: EngineDeadError) -> None:
        """Ends every tracked stream with ``err`` (on the event loop, while the engine thread is
        still inside a step; it only delivers to these streams afterwards, which nobody reads)."""
        with self._cv:
            self._dead = self._dead or err
            pending, self._commands = self._commands, []
        for cmd in pending:
            if isinstance(cmd, _Add):
                cmd.done(err)
        for tracked in list(self._tracked.values()):  # one C-level copy: safe against the engine thread
            tracked.stream.put(err)

    def num_queued_requests(self) -> int:
        """Sequences that would wait for the engine: queued commands plus the scheduler's waiting
        queue, less the free running slots they will take at the next step."""
        with self._cv:
            return self._queued()

    def _queued(self) -> int:  # under _cv
        return max(0, self._num_pending + self._num_waiting - self._free_slots)

    # ---- the asyncio side ------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: PromptType | ProcessedInput,
        params: SamplingParams | None = None,
        *,
        stream: bool = True,
        priority: int = 0,
        arrival_time: float | None = None,
        check_queue: bool = True,
    ) -> RequestStream:
        """Queues a request and waits until the engine accepted it (validation errors raise here).

        A ProcessedInput (``input_processor.process``, run by the caller) is queued without being
        checked again; ``params`` is then None. With ``stream`` the returned stream yields delta
        outputs every step; without it, only the final output. If the caller is cancelled while
        waiting, the request is aborted. With ``max_num_queued_requests`` set and ``check_queue``,
        a full waiting queue raises QueueFullError (nothing is queued).
        """
        if self._dead is not None:
            raise self._dead
        if self._thread is None:
            self.start()
        loop = asyncio.get_running_loop()
        accepted: asyncio.Future[None] = loop.create_future()
        out = RequestStream(request_id)
        cap = self.max_num_queued_requests if check_queue else None

        def done(err: BaseException | None) -> None:  # runs on the engine thread
            def resolve() -> None:
                if accepted.done():
                    return
                if err is None:
                    accepted.set_result(None)
                else:
                    accepted.set_exception(err)

            loop.call_soon_threadsafe(resolve)

        self._push(_Add(request_id, prompt, params, arrival_time or time.time(), priority, stream, out, done),
                   cap=cap)
        try:
            await accepted
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return out

    async def generate(
        self, prompt: PromptType | ProcessedInput, params: SamplingParams | None, request_id: str, *,
        stream: bool = True, priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Adds a request and yields its outputs; leaving early (break, cancel) aborts it."""
        rs = await self.add_request(request_id, prompt, params, stream=stream, priority=priority)
        try:
            async for out in rs:
                yield out
        finally:
            if not rs.finished:
                self.abort(request_id)

    def abort(self, request_ids: str | list[str]) -> None:
        """Removes requests wherever they are and frees their blocks (applied before the next step)."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        if ids and self._dead is None:
            self._push(_Abort(ids))

    def release_kv(self, request_ids: list[str]) -> None:
        if request_ids and self._dead is None:
            self._push(_ReleaseKV(list(request_ids)))

    async def check_health(self) -> None:
        if self._dead is not None:
            raise self._dead
        if not self._loop_running():
            raise EngineDeadError("the engine loop is not running")
        self.engine.check_health()

    def _push(self, cmd: _Add | _Abort | _ReleaseKV, cap: int | None = None) -> None:
        with self._cv:
            # checked under the lock _die takes: a command can never be queued after the drain
            if self._dead is not None:
                if isinstance(cmd, _Add):
                    raise self._dead
                return
            if isinstance(cmd, _Add):
                queued = self._queued()
                if cap is not None and queued >= cap:
                    raise QueueFullError(queued, cap)
                self._num_pending += cmd.num_sequences
            self._commands.append(cmd)
            self._cv.notify()

    def _update_queue_counts(self, applied: int, after_step: bool = True) -> None:
        """After commands were applied or a step ran: the scheduler's waiting count, read on the
        engine thread, replaces the applied commands' share of the pending count. The free
        running slots are known after a step: requests still waiting then, with slots free, wait
        for KV blocks or token budget, and no slot counts as free."""
        sched = self.engine.scheduler
        waiting = len(sched.waiting)
        free = 0 if waiting else max(0, self.engine.config.scheduler.max_num_seqs - len(sched.running))
        with self._cv:
            self._num_pending -= applied
            self._num_waiting = waiting
            if after_step:
                self._free_slots = free

    # ---- the engine thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._commands or self._stopping or self.engine.has_unfinished_requests()):
                        self._maybe_log_stats()
                        self._cv.wait(timeout=self.log_stats_interval)
                    if self._stopping:
                        self._die(EngineDeadError("the engine was shut down"), expected=True)
                        return
                    commands, self._commands = self._commands, []
                for cmd in commands:
                    self._apply(cmd)
                self._update_queue_counts(sum(c.num_sequences for c in commands if isinstance(c, _Add)),
                                          after_step=False)
                outputs = None
                if self.engine.has_unfinished_requests():
                    outputs = self.engine.step()
                    self._update_queue_counts(0)
                # stats before outputs: a client that holds its answer finds that step in /metrics
                # (delivered first, a scrape could read the idle state of the step before)
                self._refresh_stats()
                if outputs is not None:
                    self._deliver(outputs)
                self._maybe_log_stats()
        except BaseException as e:  # noqa: BLE001 - any failure of the step loop kills the engine
            self._die(e)

    def _apply(self, cmd: _Add | _Abort | _ReleaseKV) -> None:
        if isinstance(cmd, _Add):
            try:
                self.engine.add_request(
                    cmd.request_id, cmd.prompt, cmd.params, cmd.arrival_time, cmd.priority, delta=cmd.stream
                )
            except Exception as e:  # validation errors go back to the caller
                cmd.done(e)
                return
            self._tracked[cmd.request_id] = _Tracked(cmd.out, cmd.stream, cmd.arrival_time)
            self.metrics.requests_added += 1
            cmd.done(None)
        elif isinstance(cmd, _ReleaseKV):
            self.engine.release_kv(cmd.request_ids)
        else:
            outputs = self.engine.abort_request(cmd.request_ids)
            self._deliver(outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        now = time.time()
        ready: list[tuple[RequestStream, RequestOutput]] = []
        for out in outputs:
            t = self._tracked.get(out.request_id)
            if t is None:
                continue
            n = sum(len(o.token_ids) for o in out.outputs) if isinstance(out, RequestOutput) else 0  # (pooling)
            total = t.num_tokens + n if t.want_deltas else n
            if total > t.num_tokens:
                if t.last_token_time is None:
                    self.metrics.ttft.observe(now - t.arrival_time)
                else:
                    self.metrics.itl.observe(now - t.last_token_time)
                t.last_token_time = now
                t.num_tokens = total
            if out.finished:
                del self._tracked[out.request_id]
                self.metrics.record_finished(out, now - t.arrival_time)
            if out.finished or t.want_deltas:
                ready.append((t.stream, out))
        if ready:
            self._call_soon(_put_all, ready)

    def _die(self, exc: BaseException, expected: bool = False) -> None:
        """Fails every request in flight and every queued command; the engine takes no more."""
        if not expected:
            logger.error("the engine step loop failed; failing %d request(s) in flight", len(self._tracked),
                         exc_info=exc)
        err = exc if isinstance(exc, EngineDeadError) else EngineDeadError(f"the engine failed: {exc!r}")
        with self._cv:
            self._dead = err
            pending, self._commands = self._commands, []
        for cmd in pending:
            if isinstance(cmd, _Add):
                cmd.done(err)
        streams = [t.stream for t in self._tracked.values()]
        try:  # give the blocks back where the engine still can
            self.engine.abort_request(list(self._tracked))
        except Exception:  # noqa: BLE001
            logger.exception("could not abort the requests of the dead engine")
        self._tracked.clear()
        self.metrics.requests_failed += len(streams)
        self._call_soon(_put_all, [(s, err) for s in streams])

    def _refresh_stats(self) -> None:
        try:
            self._stats = self.engine.get_stats()
        except Exception:  # noqa: BLE001 - stats are for observation; serving goes on without them
            if not self._stats_failed:
                logger.exception("LLMEngine.get_stats failed; /metrics shows the last stats it gave")
            self._stats_failed = True

    def _call_soon(self, fn: Callable, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # the loop closed meanwhile (shutdown)
                pass

    def _maybe_log_stats(self) -> None:
        if not self.log_stats:
            return
        now = time.monotonic()
        log = self._stat_log
        elapsed = now - log.last_time
        if elapsed < self.log_stats_interval:
            return
        s = self._stats
        prompt, gen = s.prompt_tokens_total, s.generation_tokens_total
        moved = prompt != log.last_prompt_tokens or gen != log.last_generation_tokens
        busy = s.num_running or s.num_waiting or moved
        if busy:
            logger.info(
                "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
                "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s",
                s.num_running, s.num_waiting, 100 * s.kv_cache.kv_cache_usage,
                (prompt - log.last_prompt_tokens) / elapsed, (gen - log.last_generation_tokens) / elapsed,
            )
        log.last_time, log.last_prompt_tokens, log.last_generation_tokens = now, prompt, gen


def _put_all(items: list[tuple[RequestStream, RequestOutput | BaseException]]) -> None:
    for stream, item in items:
        stream.put(item)
