"""Ray plumbing for the tensor-parallel executor: connecting to a cluster, placement, the worker actor.

Ray is imported lazily (it is an optional dependency, ``pip install paged-engine[ray]``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from typing import Any

from engine.errors import EngineStartupError

logger = logging.getLogger(__name__)

# environment variables a worker process needs to see as the driver does
FORWARDED_ENV_PREFIXES = ("PAGED_ENGINE_", "TRITON_", "HF_", "TOKENIZERS_", "CUDA_LAUNCH_BLOCKING")
LOCAL_CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": a local Ray listens on 127.0.0.1 only


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def placement_timeout_s() -> float:
    """How long to wait for the cluster to grant the placement group before failing."""
    return _env_float("PAGED_ENGINE_RAY_PLACEMENT_TIMEOUT", 60.0)


def startup_timeout_s() -> float:
    """Bound on starting actors, joining the process group, loading weights and sizing the cache."""
    return _env_float("PAGED_ENGINE_RAY_STARTUP_TIMEOUT", 900.0)


def step_timeout_s() -> float:
    """Bound on one model step; a dead worker is noticed much sooner, through Ray's actor events."""
    return _env_float("PAGED_ENGINE_RAY_STEP_TIMEOUT", 300.0)


def import_ray() -> Any:
    """Imports ray. When this process is about to start a local cluster (no RAY_ADDRESS, no cluster
    started by ``ray start`` on this host), it is made to listen on loopback only."""
    import sys

    if "ray" not in sys.modules and not os.environ.get("RAY_ADDRESS"):
        from pathlib import Path

        if not (Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster").exists():
            os.environ.setdefault(LOCAL_CLUSTER_ENV, "0")
    try:
        import ray
    except ImportError as e:
        raise EngineStartupError(
            "tensor_parallel_size > 1 runs workers on Ray, which is not installed: pip install 'paged-engine[ray]'"
        ) from e
    return ray


def connect(ray: Any) -> bool:
    """Attaches to the Ray cluster (RAY_ADDRESS, else one ``ray start`` left on this host, else a new
    local one). Returns whether this call connected, i.e. whether shutdown should disconnect."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS") or None
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = address or "the cluster recorded by `ray start` on this host (or a new local one)"
        raise EngineStartupError(f"could not connect to Ray at {where}: {e}") from e
    ctx = ray.get_runtime_context()
    logger.info("Ray: connected to %s (node %s)", ctx.gcs_address, ray.util.get_node_ip_address())
    return True


def bundle_for(device_type: str) -> dict[str, float]:
    return {"GPU": 1.0} if device_type == "cuda" else {"CPU": 1.0}


PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def placement_strategy() -> str:
    """How an engine's bundles are spread over nodes: PACK (default: as few nodes as possible),
    or STRICT_SPREAD (each rank or stage on its own node), from PAGED_ENGINE_RAY_PLACEMENT_STRATEGY."""
    strategy = os.environ.get("PAGED_ENGINE_RAY_PLACEMENT_STRATEGY", "PACK").upper()
    if strategy not in PLACEMENT_STRATEGIES:
        raise EngineStartupError(
            f"PAGED_ENGINE_RAY_PLACEMENT_STRATEGY={strategy!r} is not a Ray placement strategy; use one of "
            f"{', '.join(PLACEMENT_STRATEGIES)}"
        )
    return strategy


def create_placement_group(ray: Any, tp_size: int, device_type: str, what: str | None = None,
                           strategy: str | None = None) -> Any:
    """One bundle per rank, placed by ``strategy`` (``placement_strategy()`` by default). Fails at
    once when the cluster cannot ever hold it, and after ``placement_timeout_s`` when the resources
    stay taken. ``what`` names the layout in messages (default: the tensor-parallel size)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    strategy = strategy or placement_strategy()
    what = what or f"tensor_parallel_size={tp_size}"
    bundle = bundle_for(device_type)
    (resource, per_rank), = bundle.items()
    need = per_rank * tp_size
    total = ray.cluster_resources().get(resource, 0)
    if total < need:
        raise EngineStartupError(
            f"{what} needs {need:g} {resource} in the Ray cluster (one per rank), "
            f"but the cluster has {total:g}; add nodes, or start Ray with more, e.g. `ray start --head --num-cpus={int(need)}`"
        )
    if strategy == "STRICT_SPREAD":
        nodes = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(resource, 0) >= per_rank]
        if len(nodes) < tp_size:
            raise EngineStartupError(
                f"{what} with PAGED_ENGINE_RAY_PLACEMENT_STRATEGY=STRICT_SPREAD needs {tp_size} nodes with a "
                f"{resource} each, but the cluster has {len(nodes)}; add nodes or use PACK"
            )
    pg = placement_group([dict(bundle) for _ in range(tp_size)], strategy=strategy, name="")
    timeout = placement_timeout_s()
    if not pg.wait(timeout_seconds=timeout):
        remove_placement_group(pg)
        free = ray.available_resources().get(resource, 0)
        raise EngineStartupError(
            f"Ray could not place {tp_size} workers ({need:g} {resource}, {strategy}) within {timeout:g} s: "
            f"{free:g} of the cluster's {total:g} {resource} are free; another job holds the rest "
            "(raise PAGED_ENGINE_RAY_PLACEMENT_TIMEOUT to wait longer)"
        )
    return pg


def forwarded_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def interface_for_ip(ip: str) -> str | None:
    """The network interface holding ``ip`` (gloo binds its sockets there)."""
    try:
        import psutil
    except ImportError:
        return "lo" if ip.startswith("127.") else None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == ip for a in addrs):
            return name
    return None


@dataclass
class WorkerInfo:
    rank: int
    node_id: str
    ip: str
    pid: int


class RayWorkerWrapper:
    """The body of one Ray actor: builds a Worker and forwards calls to it by name."""

    def __init__(self, env: dict[str, str], num_threads: int) -> None:
        # set here rather than through a Ray runtime_env, which costs seconds per actor
        os.environ.update(env)
        import torch

        torch.set_num_threads(max(1, num_threads))
        self.worker = None

    def get_info(self) -> tuple[str, str, int]:
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def init_worker(self, config: Any, rank: int, init_method: str, gloo_ip: str) -> None:
        if config.device.type == "cuda":
            import torch

            config.device = torch.device("cuda", 0)  # Ray's CUDA_VISIBLE_DEVICES shows this actor one GPU
        iface = interface_for_ip(gloo_ip)
        if iface is not None and config.device.type == "cpu":
            os.environ["GLOO_SOCKET_IFNAME"] = iface  # gloo listens on the node's address, not on all
        if config.parallel.pipeline_parallel_size > 1:  # a stage's worker: the same call surface
            from engine.pipeline.worker import PipelineWorker as worker_cls
        else:
            from engine.worker.worker import Worker as worker_cls
        self.worker = worker_cls(config, rank=rank, distributed_init_method=init_method)

    def set_init_method(self, init_method: str) -> None:
        self.worker.distributed_init_method = init_method

    def wait_forever(self) -> None:
        """Called once in the "monitor" concurrency group: its result only ever arrives as the error
        Ray reports when this actor dies, which is how the driver notices deaths between steps."""
        threading.Event().wait()

    def execute_method(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return getattr(self.worker, method)(*args, **kwargs)
