"""Executors run workers; the engine talks to workers only through this surface."""
from __future__ import annotations

from abc import ABC, abstractmethod

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

    def record_decode_plans(self, num_reqs: int) -> list[int]:
        """Records decode replays of up to ``num_reqs`` requests now, not at the first step of each
        size; returns the batch sizes that replay (none with tensor or pipeline parallelism, whose
        steps run eagerly)."""
        if self.config.parallel.tensor_parallel_size > 1 or self.config.parallel.pipeline_parallel_size > 1:
            return []
        return self.collective_rpc("record_decode_plans", num_reqs)[0]

    def check_health(self) -> None:
        self.collective_rpc("check_health")

    def shutdown(self) -> None:
        pass


class UniProcExecutor(Executor):
    """One worker in this process."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        from engine.worker.worker import Worker

        self.worker = Worker(config, rank=0)

    def collective_rpc(self, method: str, *args, **kwargs) -> list:
        return [getattr(self.worker, method)(*args, **kwargs)]

    def shutdown(self) -> None:
        self.worker.shutdown()


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
