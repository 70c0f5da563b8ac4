"""Executors run workers; the engine talks to workers only through this surface."""
from __future__ import annotations

from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from engine.config import EngineConfig
from engine.scheduler.output import SchedulerOutput
from engine.worker.model_runner import ModelRunnerOutput


class Executor(ABC):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config

    @abstractmethod
    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        """Calls ``Worker.method`` on every rank and returns their results in rank order."""

    def load_model(self) -> None:
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")

    def determine_num_blocks(self) -> int:
        # every rank must fit the cache: take the smallest
        return min(self.collective_rpc("determine_num_blocks"))

    def kv_bytes_per_block(self) -> int:
        return self.collective_rpc("kv_bytes_per_block")[0]

    def init_cache(self, num_blocks: int) -> None:
        self.collective_rpc("init_cache", num_blocks)

    def init_swap_space(self, num_host_blocks: int) -> None:
        self.collective_rpc("init_swap_space", num_host_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.collective_rpc("execute_model", scheduler_output)[0]

    def check_health(self) -> None:
        self.collective_rpc("check_health")

    def shutdown(self) -> None:
        pass


class UniProcExecutor(Executor):
    """One worker in this process, on a thread of its own: every call into it (start-up, warm-up,
    plan recording, each step) runs on that thread, whichever thread the engine is driven from.

    libgomp keeps a team of threads per thread that opens parallel regions. With two such threads
    (the server builds the engine on its main thread and steps it on its loop thread) it counts
    more threads than cores and stops spin-waiting at its barriers: every kernel then waited on a
    futex, and a served decode step took 30 ms instead of 19 (docs/performance.md, "One thread for
    the worker"). One thread per worker keeps one team, as a Ray worker's actor thread does."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from engine.worker.worker import Worker

        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="worker")
        try:
            self.worker = self._on_worker_thread(Worker, config, rank=0)
        except BaseException:
            self._thread.shutdown(wait=False)
            raise

    def _on_worker_thread(self, fn: Callable, *args, **kwargs) -> Any:
        return self._thread.submit(fn, *args, **kwargs).result()

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        return [self._on_worker_thread(getattr(self.worker, method), *args, **kwargs)]

    def shutdown(self) -> None:
        try:
            self._on_worker_thread(self.worker.shutdown)
        finally:
            self._thread.shutdown(wait=True)


def make_executor(config: EngineConfig) -> Executor:
    backend = config.parallel.distributed_executor_backend
    if config.parallel.pipeline_parallel_size > 1:
        if backend not in (None, "ray"):
            raise ValueError(f"pipeline_parallel_size > 1 runs its stages on Ray; distributed_executor_backend="
                             f"{backend!r} cannot: use 'ray'")
        from engine.pipeline.executor import PipelineRayExecutor

        return PipelineRayExecutor(config)
    if config.parallel.tensor_parallel_size == 1 and backend in (None, "uni", "mp"):
        return UniProcExecutor(config)
    if backend == "ray":
        from engine.executor.ray_executor import RayExecutor

        return RayExecutor(config)
    raise ValueError(
        f"distributed_executor_backend={backend!r} with tensor_parallel_size={config.parallel.tensor_parallel_size} "
        "is not supported; use 'ray' for tensor parallelism"
    )
