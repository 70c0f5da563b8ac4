"""RMSNorm, dispatching to the fused Triton kernel on CUDA, the C kernel on fp32 CPU, and torch elsewhere."""
from __future__ import annotations

import torch
from torch import nn

from engine.kernels import torch_ref
from engine.kernels.cpu.ops import fp32_cpu_kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.is_cuda:
            from engine.kernels.rmsnorm import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        kernels = fp32_cpu_kernels(x, self.weight)
        if kernels is not None and x.dim() == 2 and x.is_contiguous() and (residual is None or residual.is_contiguous()):
            return kernels.rms_norm(x, self.weight, self.eps, residual)  # the residual is updated in place
        return torch_ref.rms_norm(x, self.weight, self.eps, residual)
