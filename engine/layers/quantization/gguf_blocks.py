"""GGUF block types: which ones the kernels run, their layouts, and their dequantization in torch.

Two families: 32-value blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the k-quants' 256-value
super-blocks (Q4_K, Q5_K, Q6_K) of eight 32-value sub-blocks, each with its own 6-bit (Q4_K,
Q5_K) or int8 (Q6_K, per 16 values) scale under one fp16 super-scale. The kernels dequantize 32
values at a time either way (:data:`BLOCK`); a row is a whole number of :func:`block_values`.

The torch dequantization gives the bits of the gguf package's numpy code (and of gguf_cpu.c):
every scale product (``d * q``, ``d * sc``, ``(d * sc) * q``, ``dmin * m``) is exact in fp32 for
these types (at most 11 + 7 + 6 significant bits), so a value with an offset (``d * q + m``,
``d * sc * q - dmin * m``) rounds once whichever way it is computed. It is the fallback where the
C kernels cannot be built and the reference the tests hold the kernels to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# GGML type numbers
Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K = 2, 3, 6, 7, 8, 12, 13, 14
BLOCK = 32  # values per (sub-)block: the unit the kernels dequantize


@dataclass(frozen=True)
class BlockFormat:
    name: str
    values: int  # values per block (32, or 256 for a k-quant super-block)
    nbytes: int  # bytes per block
    half_offsets: tuple[int, ...]  # where the block's fp16 scales lie (for the load-time check)


FORMATS: dict[int, BlockFormat] = {
    Q4_0: BlockFormat("Q4_0", 32, 18, (0,)),
    Q4_1: BlockFormat("Q4_1", 32, 20, (0, 2)),
    Q5_0: BlockFormat("Q5_0", 32, 22, (0,)),
    Q5_1: BlockFormat("Q5_1", 32, 24, (0, 2)),
    Q8_0: BlockFormat("Q8_0", 32, 34, (0,)),
    Q4_K: BlockFormat("Q4_K", 256, 144, (0, 2)),
    Q5_K: BlockFormat("Q5_K", 256, 176, (0, 2)),
    Q6_K: BlockFormat("Q6_K", 256, 210, (208,)),
}
KERNEL_TYPES: dict[int, str] = {t: f.name for t, f in FORMATS.items()}
BLOCK_BYTES: dict[int, int] = {t: f.nbytes for t, f in FORMATS.items()}
# float types loaded as they are (widened to the model dtype): F32, F16, BF16
FLOAT_TYPES: dict[int, str] = {0: "F32", 1: "F16", 30: "BF16"}


def type_name(type_id: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return f"type {type_id}"


def block_values(type_id: int) -> int:
    return FORMATS[type_id].values


def row_bytes(type_id: int, k: int) -> int:
    return k // FORMATS[type_id].values * FORMATS[type_id].nbytes


def _half(b: torch.Tensor) -> torch.Tensor:
    """uint8 [..., 2] -> fp32 [...] (little-endian fp16)."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: byte j holds value j (low nibble) and j + 16 (high)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 8n] bits, little-endian (bit i of the n-byte integer at i)."""
    return ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=b.device)) & 1).flatten(-2)


def k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: the 12 packed bytes [..., 12] -> eight 6-bit scales and mins (int32 [..., 8])."""
    s = s.to(torch.int32)
    lo, mid, hi = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([lo & 63, (hi & 15) | ((lo >> 6) << 4)], dim=-1)
    mn = torch.cat([mid & 63, (hi >> 4) | ((mid >> 6) << 4)], dim=-1)
    return sc, mn


def _dequant_blocks(b: torch.Tensor, type_id: int) -> torch.Tensor:
    """uint8 [..., block bytes] -> fp32 [..., block values]."""
    if type_id == Q6_K:
        d = _half(b[..., 208:210]).unsqueeze(-1)
        ql, qh = b[..., 0:128], b[..., 128:192]
        ql = ql.unflatten(-1, (2, 64))
        low = torch.stack([ql & 0x0F, ql >> 4], dim=-2).flatten(-2)  # [..., half, 128]: value 64 nib + j
        shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device).unsqueeze(-1)
        high = ((qh.unflatten(-1, (2, 1, 32)) >> shifts) & 3).flatten(-2)  # [..., half, 128]: value 32 s + i
        q = ((low | (high << 4)).flatten(-2).to(torch.int32) - 32).float()
        dsc = d * b[..., 192:208].contiguous().view(torch.int8).float()  # [..., 16]: one per 16 values
        return dsc.repeat_interleave(16, dim=-1) * q
    if type_id in (Q4_K, Q5_K):
        d, dmin = _half(b[..., 0:2]).unsqueeze(-1), _half(b[..., 2:4]).unsqueeze(-1)
        sc, mn = k_scale_min(b[..., 4:16])
        qs = b[..., 16:144] if type_id == Q4_K else b[..., 48:176]
        qs = qs.unflatten(-1, (4, 1, 32))
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-2).flatten(-3, -2)  # [..., 8 sub-blocks, 32]
        if type_id == Q5_K:  # bit j of byte i: the fifth bit of value i of sub-block j
            q = q | ((b[..., 16:48].unsqueeze(-2) >> torch.arange(8, dtype=torch.uint8, device=b.device)
                      .unsqueeze(-1)) & 1) << 4
        dsc, dm = (d * sc.float()).unsqueeze(-1), (dmin * mn.float()).unsqueeze(-1)
        return (dsc * q.float() - dm).flatten(-2)
    d = _half(b[..., 0:2]).unsqueeze(-1)
    if type_id == Q8_0:
        return b[..., 2:].contiguous().view(torch.int8).float() * d
    if type_id in (Q5_0, Q5_1):
        at = 2 if type_id == Q5_0 else 4
        q = (_nibbles(b[..., at + 4:]) | (_bits(b[..., at:at + 4]) << 4)).float()
        return d * (q - 16) if type_id == Q5_0 else d * q + _half(b[..., 2:4]).unsqueeze(-1)
    q = _nibbles(b[..., 4:] if type_id == Q4_1 else b[..., 2:]).float()
    return d * q + _half(b[..., 2:4]).unsqueeze(-1) if type_id == Q4_1 else d * (q - 8)


def dequantize(blocks: torch.Tensor, type_id: int, k: int) -> torch.Tensor:
    """uint8 [N, row bytes] in the GGUF block layout -> fp32 [N, K] (on the blocks' device)."""
    f = FORMATS[type_id]
    n = blocks.shape[0]
    return _dequant_blocks(blocks.reshape(n, k // f.values, f.nbytes), type_id).reshape(n, k)


def block_scales(blocks: torch.Tensor, type_id: int) -> torch.Tensor:
    """The fp16 scales of every block, as fp32: for the load-time sanity check."""
    f = FORMATS[type_id]
    b = blocks.reshape(-1, f.nbytes)
    return torch.cat([_half(b[:, at:at + 2]) for at in f.half_offsets])


# --- reference quantizers: round to nearest, for tests and tiny files (the format is what matters,
# not the quantization error; llama.cpp's quantizers search for better scales) ---

def _safe_div(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    return torch.where(d > 0, x / torch.where(d > 0, d, 1.0), torch.zeros_like(x))


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    return q[..., :16] | (q[..., 16:] << 4)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[..., 8n] bits -> [..., n] bytes, little-endian."""
    weights = (1 << torch.arange(8, dtype=torch.int32)).to(torch.uint8)
    return (bits.unflatten(-1, (-1, 8)) * weights).sum(-1).to(torch.uint8)


def _h(x: torch.Tensor) -> torch.Tensor:
    return x.half().contiguous().view(torch.uint8).reshape(*x.shape[:-1], 2 * x.shape[-1])


def _quantize_32(g: torch.Tensor, type_id: int) -> torch.Tensor:
    """[..., 32] fp32 -> [..., block bytes] for the 32-value types."""
    if type_id == Q8_0:
        d = (g.abs().amax(-1, keepdim=True) / 127).half().float()
        q = _safe_div(g, d).round().clamp(-127, 127).to(torch.int8)
        return torch.cat([_h(d), q.view(torch.uint8)], dim=-1)
    levels = 15 if type_id in (Q4_0, Q4_1) else 31
    if type_id in (Q4_1, Q5_1):
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        d, m = ((hi - lo) / levels).half().float(), lo.half().float()
        q = _safe_div(g - m, d).round().clamp(0, levels).to(torch.uint8)
        head = [_h(d), _h(m)]
    else:
        zero = (levels + 1) // 2
        d = (g.abs().amax(-1, keepdim=True) / zero).half().float()
        q = (_safe_div(g, d).round() + zero).clamp(0, levels).to(torch.uint8)
        head = [_h(d)]
    if levels == 31:
        head.append(_pack_bits(q >> 4))
    return torch.cat([*head, _pack_nibbles(q & 0x0F)], dim=-1)


def _pack_k_scales(sc: torch.Tensor, mn: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins [..., 8] -> the 12 bytes :func:`k_scale_min` reads."""
    sc, mn = sc.to(torch.int32), mn.to(torch.int32)
    lo = (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6)
    mid = (mn[..., :4] & 63) | ((mn[..., 4:] >> 4) << 6)
    hi = (sc[..., 4:] & 15) | ((mn[..., 4:] & 15) << 4)
    return torch.cat([lo, mid, hi], dim=-1).to(torch.uint8)


def _quantize_k(g: torch.Tensor, type_id: int) -> torch.Tensor:
    """[..., 256] fp32 -> [..., block bytes] for the k-quants."""
    sub = g.unflatten(-1, (-1, BLOCK))  # [..., 8, 32]
    if type_id == Q6_K:
        s16 = g.unflatten(-1, (16, 16))
        scale = s16.abs().amax(-1) / 32  # [..., 16]
        d = (scale.amax(-1, keepdim=True) / 127).half().float()
        sc = _safe_div(scale, d).round().clamp(1, 127)
        step = (d * sc).unsqueeze(-1)
        q = (_safe_div(s16, step).round().clamp(-32, 31) + 32).to(torch.uint8).flatten(-2)  # [..., 256]
        halves = q.unflatten(-1, (2, 128))
        low = halves & 0x0F
        ql = (low[..., :64] | (low[..., 64:] << 4)).flatten(-2)
        high = (halves >> 4).unflatten(-1, (4, 32))  # [..., half, s, 32]
        qh = (high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)).flatten(-2)
        return torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), _h(d)], dim=-1)
    levels = 15 if type_id == Q4_K else 31
    lo = sub.amin(-1).clamp(max=0)  # [..., 8]: a min of at most 0 (w = d sc q - dmin m, m >= 0)
    scale = (sub.amax(-1) - lo) / levels
    d = (scale.amax(-1, keepdim=True) / 63).half().float()
    dmin = ((-lo).amax(-1, keepdim=True) / 63).half().float()
    sc = _safe_div(scale, d).round().clamp(0, 63)
    mn = _safe_div(-lo, dmin).round().clamp(0, 63)
    step, offset = (d * sc).unsqueeze(-1), (dmin * mn).unsqueeze(-1)
    q = _safe_div(sub + offset, step).round().clamp(0, levels).to(torch.uint8)  # [..., 8, 32]
    low = (q & 0x0F).unflatten(-2, (4, 2))  # [..., 4, 2, 32]: sub-blocks 2c (low) and 2c + 1 (high)
    qs = (low[..., 0, :] | (low[..., 1, :] << 4)).flatten(-2)
    head = [_h(d), _h(dmin), _pack_k_scales(sc, mn)]
    if type_id == Q5_K:  # byte i, bit j: the fifth bit of value i of sub-block j
        fifth = (q >> 4).transpose(-1, -2)  # [..., 32, 8]
        head.append(_pack_bits(fifth.flatten(-2)))
    return torch.cat([*head, qs], dim=-1)


def quantize_reference(w: torch.Tensor, type_id: int) -> torch.Tensor:
    """fp32 [N, K] -> uint8 blocks [N, row bytes]."""
    f = FORMATS[type_id]
    n, k = w.shape
    g = w.float().reshape(n, k // f.values, f.values)
    blocks = _quantize_k(g, type_id) if f.values == 256 else _quantize_32(g, type_id)
    return blocks.reshape(n, -1).contiguous()
