from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.kernels.cpu.ops import fp32_cpu_kernels


class SiluAndMul(nn.Module):
    """silu(gate) * up, with gate and up stacked on the last dimension."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = fp32_cpu_kernels(x)
        if kernels is not None and x.dim() == 2 and x.is_contiguous():
            return kernels.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
