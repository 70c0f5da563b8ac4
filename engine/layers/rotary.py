"""Rotary position embedding; the rope-scaling variants are strategies in rope_scaling.py."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.kernels import torch_ref
from engine.kernels.cpu.ops import fp32_cpu_kernels, heads_contiguous
from engine.layers.rope_scaling import check_rope_scaling, rope_freqs, rope_type


def rope_parameters(hf_config: Any, layer_type: str | None = None) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict or None) from either transformers 4.x or 5.x config layouts; with
    ``layer_type`` (Gemma 3: "sliding_attention" / "full_attention") that layer type's parameters."""
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict) and layer_type is not None and isinstance(params.get(layer_type), dict):
        params = params[layer_type]
    if isinstance(params, dict) and "rope_theta" in params:
        theta = float(params["rope_theta"])
        scaling = None if rope_type(params) == "default" else params
        check_rope_scaling(params)
        return theta, scaling
    theta = float(getattr(hf_config, "rope_theta", 10000.0))
    scaling = getattr(hf_config, "rope_scaling", None)
    check_rope_scaling(scaling)
    if rope_type(scaling) == "default":
        scaling = None
    return theta, scaling


class RotaryEmbedding(nn.Module):
    """One instance is shared by all layers of a model: ``prepare(positions)`` runs once per forward
    pass (the per-token cos/sin lookup), then every layer's ``forward`` rotates its q and k in place."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None = None,
                 model_max_positions: int | None = None) -> None:
        super().__init__()
        freqs, attn_factor = rope_freqs(head_dim, max_positions, theta, scaling, model_max_positions or max_positions)
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
