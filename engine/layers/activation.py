from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.errors import UnsupportedModelError
from engine.kernels.cpu.ops import fp32_cpu_kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up, with gate and up stacked on the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = fp32_cpu_kernels(x)
        if kernels is not None and x.dim() == 2 and x.is_contiguous():
            return kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


class GeluAndMul(nn.Module):
    """gelu(gate) * up (GeGLU: Gemma); ``approximate`` is torch's ("tanh" or "none")."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = fp32_cpu_kernels(x)
        if kernels is not None and kernels.has_model_kernels and x.dim() == 2 and x.is_contiguous():
            return kernels.gelu_and_mul(x, self.approximate == "tanh")
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate=self.approximate) * up


# Hugging Face activation name -> the gated activation module computing it exactly
_ACTS = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": lambda: GeluAndMul("tanh"),
    "gelu_new": lambda: GeluAndMul("tanh"),
    "gelu": lambda: GeluAndMul("none"),
}


def activation_field(config: Any) -> tuple[str, str]:
    """(config field, activation name): Gemma names it hidden_activation, the others hidden_act."""
    for field in ("hidden_activation", "hidden_act"):
        value = getattr(config, field, None)
        if value is not None:
            return field, value
    return "hidden_act", "silu"


def check_activation(config: Any) -> None:
    field, name = activation_field(config)
    if name not in _ACTS:
        raise UnsupportedModelError(f"{field} {name!r} is not supported (supported: {', '.join(sorted(_ACTS))})")


def get_act_and_mul(config: Any) -> nn.Module:
    check_activation(config)
    return _ACTS[activation_field(config)[1]]()
