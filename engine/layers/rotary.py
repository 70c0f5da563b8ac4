"""Rotary position embedding with Hugging Face's rope-scaling variants."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from engine.errors import UnsupportedModelError
from engine.kernels import torch_ref
from engine.kernels.cpu.ops import fp32_cpu_kernels, heads_contiguous


def rope_parameters(hf_config: Any) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers 4.x or 5.x config layouts."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = None if params.get("rope_type", "default") == "default" else params
        return theta, scaling
    theta = float(getattr(hf_config, "rope_theta", 10000.0))
    scaling = getattr(hf_config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return theta, scaling


def _inv_freq(head_dim: int, theta: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies, attention factor applied to cos/sin)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv / float(scaling["factor"]), 1.0
    if kind == "llama3":
        factor = float(scaling["factor"])
        low = float(scaling.get("low_freq_factor", 1.0))
        high = float(scaling.get("high_freq_factor", 4.0))
        old_len = float(scaling["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")


class RotaryEmbedding(nn.Module):
    """One instance is shared by all layers of a model: ``prepare(positions)`` runs once per forward
    pass (the per-token cos/sin lookup), then every layer's ``forward`` rotates its q and k in place."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None) -> None:
        super().__init__()
        inv, attn_factor = _inv_freq(head_dim, theta, scaling)
        t = torch.arange(max_positions, dtype=torch.int64).float()
        freqs = torch.outer(t, inv)
        cache = torch.cat([freqs.cos() * attn_factor, freqs.sin() * attn_factor], dim=-1)
        self.register_buffer("cos_sin_cache", cache, persistent=False)
        self._positions: torch.Tensor | None = None
        self._cos_sin: tuple[torch.Tensor, torch.Tensor] | None = None
        self._kernels = None

    def prepare(self, positions: torch.Tensor) -> None:
        self._positions = positions
        self._kernels = fp32_cpu_kernels(self.cos_sin_cache)
        if self._kernels is not None:
            self._positions = positions.to(torch.int64).contiguous()
        on_torch = not positions.is_cuda and self._kernels is None
        self._cos_sin = torch_ref.rotary_cos_sin(positions, self.cos_sin_cache) if on_torch else None

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query [T, H, D] and key [T, KVH, D] are rotated in place for the prepared positions."""
        if self._positions is None:
            raise RuntimeError("RotaryEmbedding.prepare(positions) must run before the layers")
        if query.is_cuda:
            from engine.kernels.rotary import rotary_embedding

            return rotary_embedding(self._positions, query, key, self.cos_sin_cache)
        if (self._kernels is not None and fp32_cpu_kernels(query, key) is not None and heads_contiguous(query)
                and heads_contiguous(key)):
            self._kernels.rotary_(self._positions, query, key, self.cos_sin_cache)
            return query, key
        if self._cos_sin is None:
            self._cos_sin = torch_ref.rotary_cos_sin(self._positions, self.cos_sin_cache)
        cos, sin = self._cos_sin
        return torch_ref.apply_rotary_(query, cos, sin), torch_ref.apply_rotary_(key, cos, sin)
