"""Rotary frequency tables, one strategy per Hugging Face ``rope_type``.

Every strategy returns ``(freqs, attention_factor)``: ``freqs[p, i]`` is the angle of frequency
``i`` at position ``p`` (``[max_positions, head_dim / 2]``) and the factor multiplies cos and sin.
Most strategies have one set of inverse frequencies for all positions (``outer(p, inv)``); the
length-dependent ones (``dynamic``, ``longrope``) pick frequencies per position, which is what
transformers computes when a single sequence grows token by token (it re-derives them from the
sequence length ``p + 1``)."""
from __future__ import annotations

import math
from typing import Callable

import torch

from engine.errors import UnsupportedModelError

Strategy = Callable[[int, int, float, dict, int], tuple[torch.Tensor, float]]


def _base_inv(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))


def _positions(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).float()


def _fixed(inv: torch.Tensor, max_positions: int) -> torch.Tensor:
    return torch.outer(_positions(max_positions), inv)


def default(head_dim: int, max_positions: int, theta: float, s: dict, model_max: int) -> tuple[torch.Tensor, float]:
    return _fixed(_base_inv(head_dim, theta), max_positions), 1.0


def linear(head_dim: int, max_positions: int, theta: float, s: dict, model_max: int) -> tuple[torch.Tensor, float]:
    return _fixed(_base_inv(head_dim, theta) / float(s["factor"]), max_positions), 1.0


def llama3(head_dim: int, max_positions: int, theta: float, s: dict, model_max: int) -> tuple[torch.Tensor, float]:
    inv = _base_inv(head_dim, theta)
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return _fixed(torch.where(medium, smoothed, scaled), max_positions), 1.0


def dynamic(head_dim: int, max_positions: int, theta: float, s: dict, model_max: int) -> tuple[torch.Tensor, float]:
    """NTK-aware: positions below the model's ``max_position_embeddings`` keep the base frequencies;
    position p past it uses the base stretched for a sequence of p + 1 tokens."""
    factor = float(s["factor"])
    freqs = _fixed(_base_inv(head_dim, theta), max_positions)
    for p in range(model_max, max_positions):
        base = theta * ((factor * (p + 1) / model_max) - (factor - 1)) ** (head_dim / (head_dim - 2))
        freqs[p] = float(p) * _base_inv(head_dim, base)
    return freqs, 1.0


def yarn(head_dim: int, max_positions: int, theta: float, s: dict, model_max: int) -> tuple[torch.Tensor, float]:
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or model_max / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (head_dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolate = 1 - ramp
    pos_freqs = theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return _fixed(inv, max_positions), float(attention)


def longrope(head_dim: int, max_positions: int, theta: float, s: dict, model_max: int) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE (``su``): per-frequency rescaling by ``short_factor`` within the original
    context and by ``long_factor`` past it, with one attention factor for all positions."""
    old_len = s["original_max_position_embeddings"]
    factor = s.get("factor") or model_max / old_len
    attention = s.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
    shape = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    short = 1.0 / (torch.tensor(s["short_factor"], dtype=torch.float32) * theta**shape)
    long = 1.0 / (torch.tensor(s["long_factor"], dtype=torch.float32) * theta**shape)
    freqs = _fixed(short, max_positions)
    if max_positions > old_len:
        freqs[old_len:] = torch.outer(_positions(max_positions)[old_len:], long)
    return freqs, float(attention)


STRATEGIES: dict[str, Strategy] = {
    "default": default, "linear": linear, "llama3": llama3, "dynamic": dynamic, "yarn": yarn,
    "longrope": longrope, "su": longrope,
}


def rope_type(scaling: dict | None) -> str:
    if not scaling:
        return "default"
    return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope_scaling(scaling: dict | None) -> None:
    """Raises UnsupportedModelError for a ``rope_scaling`` the engine cannot compute exactly."""
    kind = rope_type(scaling)
    if kind not in STRATEGIES:
        raise UnsupportedModelError(
            f"rope_scaling.rope_type {kind!r} is not supported (supported: {', '.join(sorted(STRATEGIES))})")
    if scaling and float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise UnsupportedModelError("rope_parameters.partial_rotary_factor != 1 (partial rotary) is not supported")


def rope_freqs(head_dim: int, max_positions: int, theta: float, scaling: dict | None,
               model_max: int) -> tuple[torch.Tensor, float]:
    check_rope_scaling(scaling)
    return STRATEGIES[rope_type(scaling)](head_dim, max_positions, theta, scaling or {}, model_max)
