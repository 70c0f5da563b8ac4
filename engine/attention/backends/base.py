"""The interface every attention backend implements."""
from __future__ import annotations

from abc import ABC, abstractmethod
from enum import Enum

import torch

from engine.attention.metadata import AttentionMetadata


class StepReplay(Enum):
    """How a backend's decode steps can be recorded once and replayed (engine/worker/graph_runner.py)."""

    NONE = "none"
    CUDA_GRAPH = "cuda_graph"  # its kernels are capturable into a CUDA graph
    KERNEL_PLAN = "kernel_plan"  # its kernels are C calls a CPU kernel plan can record


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and computes attention for one layer.

    ``query`` is ``[T, num_heads, head_dim]``; ``key``/``value`` are ``[T, num_kv_heads, head_dim]``
    for the step's new tokens. The caches are ``[num_blocks, block_size, num_kv_heads, head_dim]``.
    Returns ``[T, num_heads, head_dim]``.

    ``window`` and ``softcap`` are the calling layer's (engine/layers/attention.py): a query at
    position p sees only keys at positions > p - window when ``window`` > 0 (sliding-window layers),
    and scores are capped to ``softcap * tanh(s / softcap)`` when ``softcap`` > 0 (Gemma 2).
    """

    name: str = "base"
    step_replay: StepReplay = StepReplay.NONE

    @abstractmethod
    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor: ...
