"""Starting and stopping the replicas of a data-parallel engine on Ray.

Each replica gets its own placement group of ``tensor x pipeline`` bundles (one CPU or GPU per
worker rank), so a replica's ranks are packed together (or spread, with
PAGED_ENGINE_RAY_PLACEMENT_STRATEGY) independently of the other replicas. The replica actor sits
in bundle 0: with one worker it is that worker (it takes the bundle's CPU and runs the model in
process); with more it only schedules (no CPU of its own) and its executor places the ranks in the
group's bundles. Ray restarts a replica actor that dies up to ``max_restarts`` times
(PAGED_ENGINE_DP_MAX_RESTARTS, default 3).
"""
from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from engine.config import EngineArgs, EngineConfig
from engine.dp.replica import EngineReplica, ReplicaInfo
from engine.errors import EngineError, EngineStartupError
from engine.executor import ray_teardown
from engine.executor.ray_utils import (
    bundle_for, connect, create_placement_group, forwarded_env, import_ray, startup_timeout_s,
)

logger = logging.getLogger(__name__)


def max_restarts() -> int:
    return int(os.environ.get("PAGED_ENGINE_DP_MAX_RESTARTS", 3))


@dataclass
class ReplicaHandle:
    """The front end's view of one replica. ``state``: "up" (routable), "down" (died; Ray is
    restarting it), "dead" (no restarts left, or it never came back)."""

    index: int
    actor: Any
    placement_group: Any
    state: str = "starting"
    info: ReplicaInfo | None = None
    in_flight: set[str] = field(default_factory=set)
    load: int = 0  # sequences in flight (n per request)
    deaths: int = 0
    restarts: int = 0  # times it came back
    last_error: str | None = None
    stats: Any = None  # its EngineStats, refreshed about once a second

    def describe(self) -> str:
        where = f" (pid {self.info.pid} on {self.info.node_ip})" if self.info is not None else ""
        return f"data-parallel replica {self.index}{where}"


@dataclass(eq=False)  # tracked in a WeakSet (ray_teardown): hashed by identity
class ReplicaSet:
    """The replicas and what is needed to take them all down again, from any thread."""

    ray: Any
    replicas: list[ReplicaHandle]
    owns_connection: bool
    cluster_pids: set[int]
    max_restarts: int
    _closed: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def closed(self) -> bool:
        """True once shutdown began: nobody may call into Ray for these replicas any more (a call
        after ``ray.shutdown`` would start a new local Ray)."""
        return self._closed

    def shutdown(self) -> None:
        """Idempotent: asks each replica to stop its engine (2 s), kills the actors, removes the
        placement groups, and disconnects from (or stops) the local Ray this process started."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        ray_teardown.untrack(self)
        ray = self.ray
        refs = []
        for r in self.replicas:
            if r.state == "up":
                try:
                    refs.append(r.actor.shutdown.remote())
                except Exception:  # noqa: BLE001 - killed below anyway
                    pass
        if refs:
            try:
                ray.wait(refs, num_returns=len(refs), timeout=5.0)
            except Exception:  # noqa: BLE001
                pass
        from ray.util.placement_group import remove_placement_group

        for r in self.replicas:
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:  # noqa: BLE001
                pass
            try:
                remove_placement_group(r.placement_group)
            except Exception:  # noqa: BLE001
                pass
        if self.owns_connection and ray.is_initialized():
            cluster = ray_teardown.descendants(self.cluster_pids)
            ray.shutdown()
            ray_teardown.reap(cluster)


def start_replicas(engine_args: EngineArgs, config: EngineConfig) -> ReplicaSet:
    """Places and starts ``data_parallel_size`` replicas and waits until each has loaded its
    engine. Any failure stops what did start and raises (EngineStartupError, or the replica's own
    error type)."""
    ray = import_ray()
    owns, pids = ray_teardown.started_cluster(lambda: connect(ray))
    par = config.parallel
    dp, world = par.data_parallel_size, par.world_size
    device = config.device.type
    (resource, per_rank), = bundle_for(device).items()
    total = ray.cluster_resources().get(resource, 0)
    if total < dp * world * per_rank:
        if owns:
            ray.shutdown()
        raise EngineStartupError(
            f"data_parallel_size={dp} with {world} worker(s) per replica needs {dp * world} {resource} in the Ray "
            f"cluster, but it has {total:g}; lower data_parallel_size, or add nodes / start Ray with more "
            f"(`ray start --head --num-cpus={dp * world}`)"
        )
    rs = ReplicaSet(ray, [], owns, pids, max_restarts())
    ray_teardown.track(rs)
    try:
        _launch(rs, engine_args, config)
    except BaseException:
        rs.shutdown()
        raise
    return rs


def _launch(rs: ReplicaSet, engine_args: EngineArgs, config: EngineConfig) -> None:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray = rs.ray
    par = config.parallel
    world, device = par.world_size, config.device.type
    actor_cls = ray.remote(EngineReplica)
    for i in range(par.data_parallel_size):
        pg = create_placement_group(ray, world, device, what=f"replica {i} (tensor x pipeline = {world} workers)")
        in_process = world == 1  # the replica actor is the worker: it holds the bundle's CPU / GPU
        opts: dict[str, Any] = {"num_cpus": 0}
        if in_process:
            opts = {"num_cpus": 0, "num_gpus": 1} if device == "cuda" else {"num_cpus": 1}
        strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=True)
        actor = actor_cls.options(**opts, scheduling_strategy=strategy, max_restarts=rs.max_restarts,
                                  max_task_retries=0).remote(engine_args, i, forwarded_env(), 1)
        rs.replicas.append(ReplicaHandle(i, actor, pg))
    refs = [r.actor.info.remote() for r in rs.replicas]
    try:
        infos = ray.get(refs, timeout=startup_timeout_s())
    except ray.exceptions.RayTaskError as e:
        inner = getattr(e, "cause", None)
        raise (inner if isinstance(inner, EngineError) else e) from None
    except ray.exceptions.GetTimeoutError as e:
        raise EngineStartupError(f"the data-parallel replicas did not load within {startup_timeout_s():g} s "
                                 "(PAGED_ENGINE_RAY_STARTUP_TIMEOUT)") from e
    except ray.exceptions.RayActorError as e:
        raise EngineStartupError(f"a data-parallel replica died while loading: {e}") from e
    for r, info in zip(rs.replicas, infos):
        r.info, r.state = info, "up"
    logger.info("data parallel: %d replicas up: %s", len(infos),
                ", ".join(f"{i.index}: pid {i.pid} @ {i.node_ip} ({i.num_blocks} KV blocks)" for i in infos))
