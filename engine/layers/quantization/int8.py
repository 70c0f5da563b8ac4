"""int8 weights with per-output-channel scales, multiplied as int8 x int8 -> int32.

Weights are quantized symmetrically per output channel at load time (``scale = max|row| / 127``),
so a linear layer keeps a quarter of its fp32 bytes. At run time each token's activations are
quantized the same way (per row, ``max|x| / 127``) and ``torch._int_mm`` computes the exact int32
products, scaled back by ``x_scale * w_scale``.

Activations are quantized too (W8A8 with dynamic per-token scales, the scheme of vLLM's CPU int8
path), because that is what makes int8 fast on a CPU: a weight-only int8 matmul has to widen every
weight to float before multiplying (torch's ``_weight_int8pack_mm`` is slower than fp32 here),
while the integer matmul runs on VNNI / AMX-INT8 units. Because the integer products are exact and
every row has its own scale, a row's result does not depend on the other rows of the batch: batch
composition cannot change a request's output. On CPU the products run through oneDNN's prepacked
u8 x s8 kernel (1.7x fp32 at batch 1, 4-8x at batch 64-512 on an AMX machine); elsewhere through
``torch._int_mm``; both compute the same integers.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.layers.quantization.base import LinearMethod

_EPS = 1e-12  # an all-zero row gets this scale instead of 0 (no division by zero)


def quantize_rows_u8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit per row, stored shifted by 128: ``x ~= (u - 128) * scale[:, None]``.
    Returns (u uint8 in [1, 255], scale fp32 [rows]). Six dispatches: this runs before every matmul."""
    amax = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True, dtype=torch.float32).clamp_min_(_EPS)
    inv = 127.0 / amax
    u = torch.addcmul(_SHIFT, x, inv).round_().to(torch.uint8)
    return u, inv.reciprocal_().squeeze(-1)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row: ``x ~= q * scale[:, None]``; returns (q int8, scale fp32 [rows]).
    The same integers as :func:`quantize_rows_u8`, minus 128."""
    u, scale = quantize_rows_u8(x)
    return (u.to(torch.int16) - 128).to(torch.int8), scale


_SHIFT = torch.tensor(128.0)


def _onednn_available() -> bool:
    return hasattr(torch.ops, "onednn") and hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available()


def int8_matmul(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Reference and GPU path: ``x @ dequant(w_q).T (+ bias)`` with x [M, K] float, w_q [N, K] int8,
    w_scale [N] fp32 (per output channel); returns x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    x_q, x_scale = quantize_rows(x2)
    if x_q.is_cuda and m <= 16:  # cuBLAS int8 GEMM needs more than 16 rows
        x_q = torch.cat([x_q, x_q.new_zeros((17 - m, x_q.shape[1]))])
    y = torch._int_mm(x_q, w_q.t())[:m] * w_scale
    y.mul_(x_scale[:, None])
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*shape[:-1], w_q.shape[0])


def onednn_int8_matmul(x: torch.Tensor, packed: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """CPU path, the same integers as :func:`int8_matmul` through oneDNN's prepacked u8 x s8 GEMM:
    the int8 activations are shifted to uint8 (zero point 128) and given scale 1, so the kernel
    returns ``acc * w_scale`` and the per-row activation scale is applied after."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_u8, x_scale = quantize_rows_u8(x2)
    y = torch.ops.onednn.qlinear_pointwise(x_u8, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0, torch.float32,
                                           "none", [], "")
    y.mul_(x_scale[:, None])
    if bias is not None:
        y += bias
    return y.to(x.dtype).reshape(*shape[:-1], y.shape[-1])


class Int8LinearMethod(LinearMethod):
    name = "int8"
    # The input of the MLP's down projection (silu(gate) * up) has outlier channels: per-token int8
    # there alone moved SmolLM2's perplexity from 28.7 to 29.5 (docs/performance.md).
    keep_full_precision = ("mlp.down_proj",)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        q, scale = quantize_rows(layer.weight.data)
        q = q.contiguous()
        layer.weight = nn.Parameter(q, requires_grad=False)  # [N, K] int8; the fp32 copy is freed
        layer.weight_scale = nn.Parameter(scale, requires_grad=False)
        layer.int8_packed = None
        if q.device.type == "cpu" and _onednn_available():
            # oneDNN's blocked layout, packed once: the fast CPU kernel (the int8 [N, K] stays for
            # inspection and the GPU path; it is a quarter of the fp32 bytes)
            layer.int8_packed = torch.ops.onednn.qlinear_prepack(q, None)
            layer.int8_zero = torch.zeros(q.shape[0], dtype=torch.int32)

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if layer.int8_packed is not None:
            return onednn_int8_matmul(x, layer.int8_packed, layer.weight_scale, layer.int8_zero, layer.bias)
        return int8_matmul(x, layer.weight, layer.weight_scale, layer.bias)
