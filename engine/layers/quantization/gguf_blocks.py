"""GGUF block types: which ones the kernels run, their sizes, and their dequantization in torch.

The torch dequantization gives the bits of the gguf package's numpy code (and of gguf_cpu.c):
``d * q`` is exact in fp32 for these types, so Q4_1's ``d * q + m`` rounds once whichever way it is
computed. It is the fallback where the C kernels cannot be built, the GPU path, and the reference
the tests hold the kernels to.
"""
from __future__ import annotations

import torch

# GGML type numbers of the block types gguf_cpu.c multiplies directly
Q4_0, Q4_1, Q8_0 = 2, 3, 8
KERNEL_TYPES: dict[int, str] = {Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0"}
BLOCK_BYTES: dict[int, int] = {Q4_0: 18, Q4_1: 20, Q8_0: 34}
BLOCK = 32  # values per block
# float types loaded as they are (widened to the model dtype): F32, F16, BF16
FLOAT_TYPES: dict[int, str] = {0: "F32", 1: "F16", 30: "BF16"}


def type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def row_bytes(type_id: int, k: int) -> int:
    return k // BLOCK * BLOCK_BYTES[type_id]


def _half(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> fp32 [...] (little-endian fp16)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def dequantize(blocks: torch.Tensor, type_id: int, k: int) -> torch.Tensor:
    """uint8 [N, row bytes] in the GGUF block layout -> fp32 [N, K] (on the blocks' device)."""
    n = blocks.shape[0]
    b = blocks.reshape(n, k // BLOCK, BLOCK_BYTES[type_id])
    d = _half(b[..., 0:2]).unsqueeze(-1)
    if type_id == Q8_0:
        return (b[..., 2:].contiguous().view(torch.int8).float() * d).reshape(n, k)
    qs = b[..., 4:] if type_id == Q4_1 else b[..., 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=-1).float()  # byte j: value j (low), j + 16 (high)
    if type_id == Q4_1:
        return (d * q + _half(b[..., 2:4]).unsqueeze(-1)).reshape(n, k)
    return (d * (q - 8)).reshape(n, k)


def block_scales(blocks: torch.Tensor, type_id: int) -> torch.Tensor:
    """The fp16 d (and Q4_1's m) of every block, as fp32: for the load-time sanity check."""
    b = blocks.reshape(-1, BLOCK_BYTES[type_id])
    scales = [_half(b[:, 0:2])]
    if type_id == Q4_1:
        scales.append(_half(b[:, 2:4]))
    return torch.cat(scales)


def quantize_reference(w: torch.Tensor, type_id: int) -> torch.Tensor:
    """fp32 [N, K] -> uint8 blocks [N, row bytes] (round to nearest; for tests and tiny files: the
    format is what matters, not the quantization error)."""
    n, k = w.shape
    g = w.float().reshape(n, k // BLOCK, BLOCK)
    if type_id == Q8_0:
        d = (g.abs().amax(-1, keepdim=True) / 127).half()
        q = torch.where(d.float() > 0, g / d.float(), torch.zeros_like(g)).round().clamp(-127, 127).to(torch.int8)
        parts = [d.view(torch.uint8).reshape(n, -1, 2), q.view(torch.uint8)]
    else:
        if type_id == Q4_1:
            lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
            d, m = ((hi - lo) / 15).half(), lo.half()
            q = torch.where(d.float() > 0, (g - m.float()) / d.float(), torch.zeros_like(g)).round().clamp(0, 15)
        else:
            amax = g.abs().amax(-1, keepdim=True)
            d = (amax / 8).half()
            q = (torch.where(d.float() > 0, g / d.float(), torch.zeros_like(g)).round() + 8).clamp(0, 15)
        q = q.to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        parts = [d.view(torch.uint8).reshape(n, -1, 2)]
        if type_id == Q4_1:
            parts.append(m.view(torch.uint8).reshape(n, -1, 2))
        parts.append(packed)
    return torch.cat(parts, dim=-1).reshape(n, -1).contiguous()
