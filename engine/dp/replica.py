"""One data-parallel replica: a Ray actor (async) that runs a whole engine, its own scheduler, KV
cache and workers (in the actor for TP=1, else Ray actors of its own in the replica's placement
group), behind an AsyncLLMEngine.

The front end (engine/dp/client.py) talks to it with a handful of calls: ``add`` (an already
checked ProcessedInput), ``abort``, and ``poll``, a long poll that returns every output produced
since the previous one. One poll per replica is in flight at a time, so outputs cost one Ray call
per batch of steps, not one per token. If the engine inside dies (a TP worker was lost), the actor
exits, so that Ray restarts it (``max_restarts``) with a fresh engine.
"""
from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from engine.config import EngineArgs

logger = logging.getLogger(__name__)

HEALTH_CHECK_S = 1.0  # how often the actor looks at its own engine


@dataclass(frozen=True)
class ReplicaInfo:
    """What the front end learns when a replica is (again) up."""

    index: int
    pid: int
    node_id: str
    node_ip: str
    max_model_len: int
    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class ReplicaRequestError:
    """A request failed inside the replica (its engine died under it, or it was refused)."""

    message: str
    dead: bool  # the replica's engine failed (not the request's own fault)


class EngineReplica:
    """The actor body. Constructed again by Ray after a crash: each life loads its own engine."""

    def __init__(self, engine_args: EngineArgs, index: int, env: dict[str, str], num_threads: int) -> None:
        os.environ.update(env)  # (as RayWorkerWrapper does: cheaper than a runtime_env)
        import torch

        torch.set_num_threads(max(1, num_threads))
        from engine.core.async_engine import AsyncLLMEngine

        self.index = index
        self.engine: Any = None
        # kept, not raised: an exception in an actor's constructor reaches the caller only as text
        # (ActorDiedError), while ``info`` raising it hands the front end the error's own type
        self._init_error: BaseException | None = None
        try:
            self.engine = AsyncLLMEngine.from_engine_args(replace(engine_args, data_parallel_size=1), log_stats=False)
        except Exception as e:  # noqa: BLE001
            self._init_error = e
        self._outbox: list[tuple[str, Any]] = []
        self._ready = asyncio.Event()
        self._pumps: dict[str, asyncio.Task] = {}
        self._watch: asyncio.Task | None = None

    # ---- calls from the front end ---------------------------------------------------------
    async def info(self) -> ReplicaInfo:
        import ray

        if self._init_error is not None:
            raise self._init_error
        if self._watch is None:
            self.engine.start()
            self._watch = asyncio.ensure_future(self._watch_engine())
        eng = self.engine.engine
        ctx = ray.get_runtime_context()
        return ReplicaInfo(self.index, os.getpid(), ctx.get_node_id(), ray.util.get_node_ip_address(),
                           self.engine.model_config.max_model_len, eng.config.cache.num_blocks,
                           eng.config.cache.block_size)

    async def add(self, request_id: str, processed: Any, stream: bool, priority: int,
                  arrival_time: float) -> ReplicaRequestError | None:
        """Queues a checked request; its outputs come back through ``poll``. Returns the error
        (rather than raising it through Ray) when the engine refuses it."""
        try:
            out = await self.engine.add_request(request_id, processed, None, stream=stream, priority=priority,
                                                arrival_time=arrival_time, check_queue=False)
        except Exception as e:  # noqa: BLE001 - handed back typed by the front end
            from engine.errors import EngineDeadError

            return ReplicaRequestError(f"{type(e).__name__}: {e}", isinstance(e, EngineDeadError))
        self._pumps[request_id] = asyncio.ensure_future(self._pump(out))
        return None

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)

    def release_kv(self, request_ids: list[str]) -> None:
        self.engine.release_kv(request_ids)

    async def poll(self, timeout: float) -> list[tuple[str, Any]]:
        """(request id, RequestOutput or ReplicaRequestError) for everything since the last poll;
        waits up to ``timeout`` s for the first."""
        if not self._outbox:
            try:
                await asyncio.wait_for(self._ready.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        out, self._outbox = self._outbox, []
        self._ready.clear()
        return out

    def stats(self) -> Any:
        """The engine's EngineStats as of its last step."""
        return self.engine.get_stats()

    async def shutdown(self) -> None:
        for task in self._pumps.values():
            task.cancel()
        if self._watch is not None:
            self._watch.cancel()
        if self.engine is not None:
            await self.engine.shutdown(timeout=5.0)

    # ---- inside ---------------------------------------------------------------------------
    async def _pump(self, stream: Any) -> None:
        from engine.errors import EngineDeadError

        rid = stream.request_id
        try:
            async for out in stream:
                self._emit(rid, out)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - delivered to the front end as data
            self._emit(rid, ReplicaRequestError(f"{type(e).__name__}: {e}", isinstance(e, EngineDeadError)))
        finally:
            self._pumps.pop(rid, None)

    def _emit(self, request_id: str, item: Any) -> None:
        self._outbox.append((request_id, item))
        self._ready.set()

    async def _watch_engine(self) -> None:
        """Exits the actor's process once its engine has failed: Ray then restarts the replica."""
        while True:
            await asyncio.sleep(HEALTH_CHECK_S)
            try:
                await self.engine.check_health()
                if not self.engine.errored:
                    continue
            except Exception:  # noqa: BLE001
                pass
            logger.error("replica %d: its engine failed; exiting so that Ray restarts it", self.index)
            await asyncio.sleep(0.2)  # let the last poll carry the failed requests' errors
            os._exit(1)
