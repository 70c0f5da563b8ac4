"""RMSNorm, dispatching to the fused Triton kernel on CUDA, the C kernel on fp32 CPU, and torch elsewhere."""
from __future__ import annotations

import torch
from torch import nn

from engine.kernels import torch_ref
from engine.kernels.cpu.ops import fp32_cpu_kernels, heads_contiguous


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

    def forward_heads(self, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim of x [T, H, D] (a per-head q/k norm), returned [T, H, D]
        contiguous; x may be a strided view of a fused QKV output (one C call on fp32 CPU)."""
        kernels = fp32_cpu_kernels(x, self.weight)
        if kernels is not None and kernels.has_model_kernels and heads_contiguous(x):
            return kernels.rms_norm_heads(x, self.weight, self.eps)
        t, h, d = x.shape
        return self(x.reshape(t * h, d).contiguous()).view(t, h, d)


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm scales by ``1 + weight``: the checkpoint's weight is stored plus one at load
    time, so every RMSNorm kernel (C, Triton, torch) computes it unchanged."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__(hidden, eps)
        self.weight.weight_loader = self.weight_loader

    @staticmethod
    def weight_loader(param: nn.Parameter, loaded, shard_id=None) -> None:
        from engine.layers.checkpoint import materialize

        param.data.copy_(materialize(loaded).float() + 1.0)
