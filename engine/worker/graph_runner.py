"""Decode steps recorded once and replayed: the interface CUDA graphs (engine/worker/cuda_graph.py)
and CPU kernel plans (engine/worker/cpu_graph.py) share, and the choice between them, made once at
start-up by what the attention backend can replay."""
from __future__ import annotations

import logging
from typing import Protocol

import torch

from engine.attention.backends.base import AttentionBackend, StepReplay
from engine.attention.metadata import AttentionMetadata
from engine.config import EngineConfig

logger = logging.getLogger(__name__)


class StepGraphRunner(Protocol):
    max_loras: int  # > 0: replays carry LoRA rows (CPU plans); 0: a step with adapter rows runs eagerly

    def bucket(self, num_reqs: int) -> int | None:
        """The padded batch size a pure-decode step of ``num_reqs`` requests replays, or None."""

    def record_upto(self, num_reqs: int) -> list[int]:
        """Records every bucket of up to ``num_reqs`` requests not recorded yet (a server's start-up:
        a first step of a new size would otherwise pay for its recording); returns the buckets
        that replay."""

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            lora=None) -> torch.Tensor:
        """Hidden states ``[num_reqs, hidden]`` of a pure-decode step, by replay (``lora``: the step's
        LoRAContext, only where ``max_loras`` > 0)."""


def make_step_graph_runner(config: EngineConfig, model: torch.nn.Module, backend: AttentionBackend,
                           device: torch.device) -> StepGraphRunner | None:
    """The replay the backend supports on this device, or None (eager) under enforce_eager, with
    tensor parallelism (a collective inside the pass) or a backend that cannot be replayed."""
    if config.enforce_eager or backend.step_replay is StepReplay.NONE:
        return None
    if config.parallel.tensor_parallel_size > 1:
        logger.info("decode steps are replayed with one rank only; running eagerly")
        return None
    sc, max_len, bs = config.scheduler, config.model.max_model_len, config.cache.block_size
    if backend.step_replay is StepReplay.CUDA_GRAPH and device.type == "cuda":
        from engine.worker.cuda_graph import CUDAGraphRunner

        runner = CUDAGraphRunner(model, sc.max_num_seqs, max_len, bs, device)
        runner.capture()
        return runner
    if backend.step_replay is StepReplay.KERNEL_PLAN and device.type == "cpu":
        from engine.worker.cpu_graph import CpuGraphRunner

        lora = config.lora_config.max_loras if getattr(config, "lora_config", None) is not None else 0
        return CpuGraphRunner(model, backend.kernels, sc.max_num_seqs, max_len, bs, lora)
    return None
