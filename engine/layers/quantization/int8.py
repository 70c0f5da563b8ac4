"""int8 weights with per-output-channel scales (``quantization="int8"``).

Weights are quantized symmetrically per output channel after loading (``scale = max|row| / 127``,
fp32 scales) and the fp32 copy is freed: an int8 layer keeps about a quarter of its bytes.

Linear layers (:class:`Int8LinearMethod`) also quantize their *activations* at run time, per token
and per group of 64 input channels (W8A8 with dynamic scales) instead of being weight-only: on a
CPU only an integer matmul makes int8 pay at every batch size (a weight-only int8 matmul widens
every weight to float first: torch's ``_weight_int8pack_mm`` is slower than fp32 here, and our own
weight-only loop is 2x slower than fp32 from batch 64 on). Each group's int32 sum is exact and is
scaled by its own activation scale, so a row's output never depends on the other rows of the
batch. Groups rather than one scale per token because SmolLM2's activations have outlier channels:
one scale per token moved logprobs 2.4x as much (docs/performance.md).

On CPU the whole layer is one call of the C kernel in int8_cpu.c at every batch size; without it
(no C compiler) and on GPU the same numbers come from one ``torch._int_mm`` per group.

The LM head (:class:`Int8WeightOnlyMethod`) is weight-only: int8 activations there cost accuracy
and the head is a single matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.quantization import cpu_kernels
from engine.layers.quantization.base import LayerKind, LinearMethod, QuantizationScheme

EPS = 1e-12  # an all-zero row or group gets this amax instead of 0: scale > 0, no 0/0
GROUP = 64  # input channels per activation scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``x ~= q * scale[:, None]``; returns (q int8, scale fp32 [rows])."""
    q, scale = quantize_groups(x, x.shape[-1])
    return q, scale.squeeze(-1)


def quantize_groups(x: torch.Tensor, group: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row and group of ``group`` columns (the last group may be shorter):
    returns (q int8 like x, scale fp32 [rows, groups]).

    ``q = round_half_even(x * (127 / amax))``, ``scale = amax / 127``: the operations of
    ``q8_quantize`` in int8_cpu.c, so both give the same bits."""
    x = x.float()
    k = x.shape[-1]
    ng = -(-k // group)
    padded = F.pad(x, (0, ng * group - k)).view(*x.shape[:-1], ng, group)
    amax = padded.abs().amax(dim=-1, keepdim=True).clamp_min_(EPS)
    # tensor / tensor: ``127.0 / amax`` would be computed as ``reciprocal(amax) * 127`` (another
    # rounding, which moves some x * inv off or onto a .5 tie), and ``amax / 127.0`` as a multiply
    c127 = torch.full_like(amax, 127.0)
    q = (padded * (c127 / amax)).round_().to(torch.int8).view(*x.shape[:-1], ng * group)[..., :k]
    return q.contiguous(), (amax / c127).squeeze(-1)


def int8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                group: int = GROUP) -> torch.Tensor:
    """``x @ dequant(w_q).T (+ bias)`` with int8 activations per row and group, one
    ``torch._int_mm`` per group: the C kernel's numbers (the same exact group sums, then
    ``sum_g (acc_g * x_scale_g)`` in group order, ``* w_scale``, ``+ bias``).

    x [..., K] float, w_q [N, K] int8, w_scale [N] fp32; returns x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m, (n, k) = x2.shape[0], w_q.shape
    x_q, x_scale = quantize_groups(x2, group)
    y = None
    for g, start in enumerate(range(0, k, group)):
        xg, wg = x_q[:, start : start + group].contiguous(), w_q[:, start : start + group].contiguous()
        t = _int_mm(xg, wg) * x_scale[:, g : g + 1]
        y = t if y is None else y.add_(t)
    y = y * w_scale
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*shape[:-1], n)


def _int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ b [N, K].T int8 -> exact int32 [M, N]."""
    m, k = a.shape
    if a.is_cuda:
        if k % 8 or b.shape[0] % 8:  # cuBLAS int8 GEMM shape rules: exact in fp32 instead (|acc| < 2^24)
            return (a.float() @ b.float().t()).to(torch.int32)
        if m <= 16:  # cuBLAS int8 GEMM needs more than 16 rows
            return torch._int_mm(torch.cat([a, a.new_zeros((17 - m, k))]), b.t())[:m]
    return torch._int_mm(a, b.t())


def _quantize_weight(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, "cpu_kernels.CpuInt8Kernels | None"]:
    """Quantizes ``layer.weight`` per output channel and sets ``weight_scale`` and ``int8_kernels``.
    Without the CPU kernel the int8 ``[N, K]`` weight replaces the fp32 one here; with it, the
    caller stores the weight in the kernel's layout. Returns (q, scale, kernels or None)."""
    q, scale = quantize_rows(layer.weight.data)
    kernels = cpu_kernels.load() if q.device.type == "cpu" else None
    layer.int8_kernels = kernels
    layer.weight_scale = nn.Parameter(scale, requires_grad=False)
    if kernels is None:
        layer.weight = nn.Parameter(q.contiguous(), requires_grad=False)  # [N, K] int8; fp32 freed
    return q, scale, kernels


class Int8LinearMethod(LinearMethod):
    """W8A8: int8 weights per output channel, int8 activations per token and group of 64 channels,
    exact int32 products. On CPU the weight is kept only in the C kernel's layout."""

    name = "int8"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale, kernels = _quantize_weight(layer)
        if kernels is None:
            return
        bias = None if layer.bias is None else layer.bias.data
        layer.int8_packed = kernels.pack(q, scale, bias, GROUP)
        layer.weight = nn.Parameter(layer.int8_packed.packed, requires_grad=False)  # [N/16, K/4, 16, 4]
        if layer.int8_packed.comp is not None:
            layer.register_buffer("weight_comp", layer.int8_packed.comp, persistent=False)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        kernels = layer.int8_kernels
        if kernels is not None:
            x2 = x.reshape(-1, x.shape[-1])
            y = kernels.w8a8(x2 if x2.dtype == torch.float32 else x2.float(), layer.int8_packed)
            return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
        return int8_matmul(x, layer.weight, layer.weight_scale, layer.bias)


class Int8WeightOnlyMethod(LinearMethod):
    """int8 weights per output channel, float activations: for the LM head (and a tied embedding,
    which then looks up int8 rows times their scale, see embedding.py).

    On CPU every batch size runs through the C loop, whose sums do not depend on the batch; on GPU
    or without the kernel the weight is dequantized a slab at a time for torch's GEMM."""

    name = "int8-weight-only"
    slab = 4096  # weight rows dequantized at a time on the torch path

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale, kernels = _quantize_weight(layer)
        if kernels is None:
            return
        bias = getattr(layer, "bias", None)
        layer.int8_packed = kernels.pack_w8(q, scale, None if bias is None else bias.data)
        layer.weight = nn.Parameter(layer.int8_packed.packed, requires_grad=False)  # [N/16, K, 16]

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if layer.int8_kernels is not None:
            y = layer.int8_kernels.w8(x2 if x2.dtype == torch.float32 else x2.float(), layer.int8_packed).to(x.dtype)
        else:
            w, s = layer.weight, layer.weight_scale
            y = torch.cat([F.linear(x2, w[i : i + self.slab].to(x2.dtype) * s[i : i + self.slab, None].to(x2.dtype))
                           for i in range(0, w.shape[0], self.slab)], dim=-1)
            bias = getattr(layer, "bias", None)
            if bias is not None:
                y += bias
        return y.reshape(*x.shape[:-1], y.shape[-1])


def int8_rows(weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` of an int8 weight as stored by :class:`Int8WeightOnlyMethod`: [N, K] or packed
    [N/16, K, 16]."""
    if weight.dim() == 3:
        return weight[ids // 16, :, ids % 16]
    return F.embedding(ids, weight)


# Linear layers int8 leaves in full precision, by name suffix (none: see docs/performance.md for
# what keeping the MLP down projections in fp32 would buy and cost).
INT8_FULL_PRECISION: tuple[str, ...] = ()


class Int8Scheme(QuantizationScheme):
    """``quantization="int8"``: W8A8 linear layers, a weight-only int8 LM head."""

    name = "int8"

    def method_for(self, kind: LayerKind, name: str) -> LinearMethod | None:
        if kind == LayerKind.LM_HEAD:
            return Int8WeightOnlyMethod()
        if kind == LayerKind.LINEAR and not name.endswith(INT8_FULL_PRECISION):
            return Int8LinearMethod()
        return None
