"""Tensor parallelism over Ray: one actor per rank, placed by a placement group.

The driver (this process) runs the scheduler once per step and sends every rank the same
SchedulerOutput, which already carries only what changed (new requests, new block ids, the tokens
scheduled, finished ids); it is serialised once (``ray.put``) and read by all ranks. Ranks compute
their shard, all-reduce over torch.distributed (gloo on CPU, nccl on GPU) and rank 0 returns the
sampled tokens.

Failures: any actor death or worker exception during a step raises EngineDeadError as soon as Ray
reports it (polled every ``POLL_S``), never waiting on the surviving ranks, which may be blocked in
a collective; ``shutdown`` then kills every actor and frees the placement group.
"""
from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
import uuid
from typing import Any

from engine.config import EngineConfig
from engine.errors import EngineDeadError, EngineError, EngineStartupError
from engine.executor.base import Executor
from engine.executor.ray_utils import (
    RayWorkerWrapper,
    WorkerInfo,
    connect,
    create_placement_group,
    forwarded_env,
    import_ray,
    startup_timeout_s,
    step_timeout_s,
)
from engine.executor import ray_teardown
from engine.scheduler.output import SchedulerOutput
from engine.worker.model_runner import ModelRunnerOutput

logger = logging.getLogger(__name__)

POLL_S = 0.5


class RayExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self.ray = import_ray()
        self.tp_size = config.parallel.tensor_parallel_size
        self.world_size = config.parallel.world_size  # tensor x pipeline ranks
        self._owns_placement_group = True
        self.actors: list[Any] = []
        self.workers: list[WorkerInfo] = []
        self.placement_group = None
        self._dead: EngineDeadError | None = None
        self._closed = False
        self._store_path: str | None = None
        self._monitor: threading.Thread | None = None
        # the processes of a local cluster this executor started (killed at shutdown if Ray leaves them)
        self._owns_connection, self._cluster_pids = ray_teardown.started_cluster(lambda: connect(self.ray))
        ray_teardown.track(self)
        try:
            self._start_workers()
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up ----------------------------------------------------------------------------
    def _start_workers(self) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        device = self.config.device.type
        self.placement_group = self._placement_group(ray, device)
        # "monitor": a second thread per actor for wait_forever; model calls stay one at a time
        actor_cls = ray.remote(concurrency_groups={"monitor": 1})(RayWorkerWrapper)
        for rank in range(self.world_size):
            strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)
            opts = {"num_cpus": 0, "num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
            actor = actor_cls.options(**opts, scheduling_strategy=strategy, max_restarts=0).remote(
                forwarded_env(), num_threads=1 if device == "cpu" else 4
            )
            self.actors.append(actor)
        t0 = time.monotonic()
        infos = self._gather([a.get_info.remote() for a in self.actors], startup_timeout_s(), "start")
        logger.debug("Ray: actors up in %.1f s", time.monotonic() - t0)
        self.workers = [WorkerInfo(rank, *info) for rank, info in enumerate(infos)]
        init_method = self._init_method()
        logger.info(
            "Ray: %d workers on %s; rendezvous %s",
            self.world_size, ", ".join(f"rank {w.rank} pid {w.pid} @ {w.ip}" for w in self.workers), init_method,
        )
        ranks = [w.rank for w in self.workers]
        self._start_monitor()
        self._gather(
            [a.init_worker.remote(self.config, w.rank, init_method, w.ip) for a, w in zip(self.actors, self.workers)],
            startup_timeout_s(), "start",
        )
        # rank 0 opens the store first; with a TCP port of 0 the others learn the port it bound
        init_method = self._gather([self.actors[0].execute_method.remote("prepare_rendezvous")], startup_timeout_s(), "start")[0]
        self._gather(
            [a.set_init_method.remote(init_method) for a in self.actors[1:]], startup_timeout_s(), "start", ranks=ranks[1:]
        )

    def _placement_group(self, ray, device: str):
        """The group of a data-parallel replica this engine runs in (engine/dp/launch.py made it with
        one bundle per rank), else a new one."""
        from ray.util.placement_group import get_current_placement_group

        current = get_current_placement_group()
        if current is not None and len(current.bundle_specs) >= self.world_size:
            self._owns_placement_group = False
            return current
        par = self.config.parallel
        what = None if par.pipeline_parallel_size == 1 else (
            f"tensor_parallel_size={par.tensor_parallel_size} x pipeline_parallel_size={par.pipeline_parallel_size} "
            f"= {self.world_size} workers")
        return create_placement_group(ray, self.world_size, device, what=what)

    def _start_monitor(self) -> None:
        """A daemon thread that marks the executor dead as soon as any actor dies, even while idle,
        so check_health (and /health) reports it without waiting for the next step."""
        refs = [a.wait_forever.options(concurrency_group="monitor").remote() for a in self.actors]

        def watch() -> None:
            ray = self.ray
            pending = list(refs)
            while pending and not self._closed and self._dead is None:
                try:
                    ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
                except Exception:  # noqa: BLE001 - Ray shut down under us
                    return
                for ref in ready:
                    if self._closed:
                        return
                    try:
                        ray.get(ref)
                    except Exception as e:  # noqa: BLE001
                        if self._dead is None and not self._closed:
                            self._failure("monitoring", e, [refs.index(ref)])
                    return

        self._monitor = threading.Thread(target=watch, name="ray-worker-monitor", daemon=True)
        self._monitor.start()

    def _init_method(self) -> str:
        """A file store when every rank is on one host (no port, nothing listening); otherwise a TCP
        store on rank 0 whose port is bound when it opens (0 = any free port, so two engines on one
        host never collide). PAGED_ENGINE_DIST_PORT pins the port, e.g. for a firewall."""
        port = os.environ.get("PAGED_ENGINE_DIST_PORT")
        if port is None and len({w.node_id for w in self.workers}) == 1:
            self._store_path = os.path.join(tempfile.gettempdir(), f"paged-engine-{uuid.uuid4().hex}.store")
            return f"file://{self._store_path}"
        return f"tcp://{self.workers[0].ip}:{int(port or 0)}"

    # ---- calls -------------------------------------------------------------------------------
    def _gather(self, refs: list, timeout: float, what: str, ranks: list[int] | None = None) -> list:
        """Results in order; raises as soon as one ref fails instead of waiting for the others."""
        ray = self.ray
        ranks = list(range(len(refs))) if ranks is None else ranks
        pending = list(refs)
        deadline = time.monotonic() + timeout
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                late = [ranks[refs.index(r)] for r in pending]
                raise self._failure(what, TimeoutError(f"no answer within {timeout:g} s"), late)
            ready, pending = ray.wait(pending, num_returns=1, timeout=min(POLL_S, left))
            for ref in ready:
                try:
                    ray.get(ref)
                except ray.exceptions.RayError as e:
                    err = self._failure(what, e, [ranks[refs.index(ref)]])
                    if err is e:
                        raise
                    raise err from e
        return ray.get(list(refs))

    def _failure(self, what: str, cause: BaseException, ranks: list[int]) -> BaseException:
        ray = self.ray
        who = ", ".join(self._describe(r) for r in ranks)
        if what == "start":
            if isinstance(cause, ray.exceptions.RayTaskError):
                inner = getattr(cause, "cause", None)
                # the worker's own error: ours as raised, others wrapped (RayTaskError subclasses them)
                return inner if isinstance(inner, EngineError) else cause
            return EngineStartupError(f"tensor-parallel worker {who} failed to start: {_short(cause)}")
        kind = "died" if isinstance(cause, ray.exceptions.RayActorError) else "failed"
        err = EngineDeadError(
            f"tensor-parallel worker {who} {kind} during {what}: {_short(cause)}; "
            "the engine cannot continue: shut it down and start a new one"
        )
        self._dead = err
        logger.error("%s", err)
        return err

    def _describe(self, rank: int) -> str:
        if rank < len(self.workers):
            w = self.workers[rank]
            return f"rank {rank} (pid {w.pid} on {w.ip})"
        return f"rank {rank}"

    def collective_rpc(self, method: str, *args, timeout: float | None = None, **kwargs) -> list:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        refs = [a.execute_method.remote(method, *args, **kwargs) for a in self.actors]
        return self._gather(refs, timeout or startup_timeout_s(), method)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise EngineDeadError("the engine was shut down")
        ref = self.ray.put(scheduler_output)  # serialised once, read by every rank
        refs = [a.execute_method.remote("execute_model", ref) for a in self.actors]
        return self._gather(refs, step_timeout_s(), "execute_model")[0]

    def check_health(self) -> None:
        """Cheap (no call into the workers, which may be busy with a step): raises EngineDeadError
        once a worker has died or failed, as the monitor thread or a step found."""
        if self._dead is not None:
            raise self._dead
        if self._closed:
            raise EngineDeadError("the engine was shut down")

    def weight_bytes(self) -> list[int]:
        """Parameter bytes each rank holds, in rank order."""
        return self.collective_rpc("weight_bytes")

    # ---- shutdown ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Idempotent; never blocks on a worker stuck in a collective: actors are killed."""
        if self._closed:
            return
        self._closed = True
        ray_teardown.untrack(self)
        ray = self.ray
        if self.actors and self._dead is None and self.workers:
            try:  # a polite goodbye first, so process groups close their sockets
                refs = [a.execute_method.remote("shutdown") for a in self.actors]
                ray.wait(refs, num_returns=len(refs), timeout=2.0)
            except Exception:  # noqa: BLE001 - the actors are killed below anyway
                pass
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
        self.actors = []
        if self.placement_group is not None and self._owns_placement_group:
            from ray.util.placement_group import remove_placement_group

            try:
                remove_placement_group(self.placement_group)
            except Exception:  # noqa: BLE001
                pass
            self.placement_group = None
        if self._store_path is not None:
            try:
                os.unlink(self._store_path)
            except OSError:
                pass
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(timeout=2.0)  # it polls every second; Ray must not go away under it
        if self._owns_connection and ray.is_initialized():
            cluster = ray_teardown.descendants(self._cluster_pids)  # listed while the tree is intact
            ray.shutdown()
            ray_teardown.reap(cluster)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:400]
