"""A worker holds one tensor-parallel shard of the model and its KV cache.

Its public methods are the whole call surface executors use; they map one-to-one onto Ray actor
methods, so the in-process and Ray executors drive workers the same way.
"""
from __future__ import annotations

import logging
import os

import torch

from engine.config import EngineConfig
from engine.distributed.parallel_state import create_store, destroy_distributed, init_distributed, set_tp_group
from engine.scheduler.output import SchedulerOutput
from engine.worker.cpu_runtime import configure_cpu_runtime
from engine.worker.model_runner import ModelRunner, ModelRunnerOutput

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 2 << 30  # like vLLM's VLLM_CPU_KVCACHE_SPACE, but 2 GiB


class Worker:
    def __init__(self, config: EngineConfig, rank: int = 0, distributed_init_method: str | None = None) -> None:
        self.config = config
        self.rank = rank
        self.tp_size = config.parallel.tensor_parallel_size
        self.distributed_init_method = distributed_init_method
        self.device = config.device
        self.runner: ModelRunner | None = None

    def prepare_rendezvous(self) -> str:
        """Rank 0 opens the rendezvous store before the other ranks join; returns the init method
        they use (with the port actually bound when the configured one is 0)."""
        self._store = create_store(self.distributed_init_method, self.rank, self.tp_size)
        if isinstance(self._store, torch.distributed.TCPStore):
            host = self.distributed_init_method[len("tcp://"):].rpartition(":")[0]
            return f"tcp://{host}:{self._store.port}"
        return self.distributed_init_method

    def init_device(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        else:
            configure_cpu_runtime()
        if self.tp_size > 1:
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            store = getattr(self, "_store", None) or create_store(self.distributed_init_method, self.rank, self.tp_size)
            init_distributed(store, self.rank, self.tp_size, backend)
        set_tp_group(self.rank, self.tp_size)
        torch.manual_seed(self.config.seed)
        self.runner = ModelRunner(self.config, self.device)

    def load_model(self, show_progress: bool = True) -> None:
        self.runner.load_model(show_progress=show_progress and self.rank == 0)

    def kv_bytes_per_block(self) -> int:
        return self.runner.kv_bytes_per_block()

    def determine_num_blocks(self) -> int:
        """How many KV blocks this rank can hold under the configured budget."""
        cache = self.config.cache
        if cache.num_gpu_blocks_override is not None:
            return cache.num_gpu_blocks_override
        per_block = self.runner.cache_bytes_per_block()  # the target's K/V and a draft model's
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            # the largest step is run once to measure its activations; what it needs stays free
            peak = self.runner.profile_peak_memory()
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free  # weights, the CUDA context and other processes
            budget = int(total * cache.gpu_memory_utilization) - used - peak
            logger.info("GPU memory: %.2f GiB total, %.2f GiB in use, %.2f GiB peak activations; KV budget %.2f GiB",
                        total / 2**30, used / 2**30, peak / 2**30, max(budget, 0) / 2**30)
        else:
            budget = int(os.environ.get("PAGED_ENGINE_CPU_KV_BYTES", DEFAULT_CPU_KV_BYTES))
        return max(budget // per_block, 0)

    def init_cache(self, num_blocks: int) -> None:
        self.runner.init_kv_cache(num_blocks)

    def init_swap_space(self, num_host_blocks: int) -> None:
        self.runner.init_swap_space(num_host_blocks)

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput | None:
        out = self.runner.execute(scheduler_output)
        return out if self.rank == 0 else None

    def weight_bytes(self) -> int:
        """Bytes of parameters this rank holds: its shard of the model and of a draft model."""
        return self.runner.weight_bytes()

    def check_health(self) -> bool:
        return True

    def record_decode_plans(self, num_reqs: int) -> list[int]:
        return self.runner.record_decode_plans(num_reqs)

    def shutdown(self) -> None:
        if self.runner is not None:
            self.runner.shutdown()
        if self.tp_size > 1:
            destroy_distributed()
