"""The attention layer: hands q/k/v to the step's attention backend with this layer's KV cache."""
from __future__ import annotations

import torch
from torch import nn

from engine.attention.backends.base import AttentionBackend
from engine.attention.metadata import get_attention_metadata


class Attention(nn.Module):
    """Stateless apart from its cache; the runner binds ``k_cache``, ``v_cache`` and ``backend``.

    ``sliding_window`` (0 = none) and ``logit_softcap`` (0 = none) are this layer's: the step's
    metadata is shared by every layer, so a per-layer window (Gemma's alternating local/global
    layers) is an attribute the backend receives with each call."""

    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int, sliding_window: int = 0,
                 logit_softcap: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = scale
        self.num_kv_heads = num_kv_heads
        self.sliding_window = int(sliding_window or 0)
        self.logit_softcap = float(logit_softcap or 0.0)
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] -> [T, H * D]."""
        if self.backend is None or self.k_cache is None:
            raise RuntimeError("the KV cache is not bound: run the model through ModelRunner")
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_attention_metadata(), self.scale,
                                   self.sliding_window, self.logit_softcap)
        return out.reshape(out.shape[0], -1)
