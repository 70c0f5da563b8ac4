"""Triton prefill / chunked-prefill attention over the paged KV cache.

The step's prefill query spans are flattened (``query_start_loc`` holds each span's start). Query token j
of request i sits at position ``ctx_i + j`` with ``ctx_i = seq_lens[i] - q_len_i`` tokens already cached
from earlier steps; it sees every key at a position <= its own, read from the cache (this step's K/V
must already be written there). Grid ``(B, cdiv(max_query_len, BLOCK_M), H)``: a program owns a tile of
BLOCK_M query rows of one head and streams that request's keys up to the tile's causal limit, with the
same online-softmax scheme as the decode kernel. Tiles past a span's end do no work.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.decode_attention import softcap_log2
from engine.kernels.triton_compat import dot_precision, next_pow2, patch_interpreter

patch_interpreter()

LOG2E = 1.4426950408889634


def launch_config(head_dim: int, fp32: bool) -> tuple[int, int, int]:
    """(BLOCK_M query rows, BLOCK_N keys per tile, num_warps).

    Chosen without a GPU from ptxas register reports for sm_90 (the sm_90 compile test checks that these
    configurations do not spill): with fp32-converted tiles every 4-warp 64x64 variant spills; at 8 warps,
    64x32 fits for head dim 128 and 64x64 for head dim <= 64. fp32 inputs (full-precision FMA dots, no
    tensor cores) need half the key tile. Tune on a GPU.
    """
    if head_dim > 64:
        return (64, 16, 8) if fp32 else (64, 32, 8)
    return (64, 32, 8) if fp32 else (64, 64, 8)


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_ptr, seq_lens_ptr, out_ptr,
    qk_scale,  # softmax scale * log2(e); the plain scale when SOFTCAP
    window,  # > 0: a row at position p sees keys at positions > p - window only
    softcap,  # used when SOFTCAP: scores become softcap * tanh(scores / softcap)
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    head_dim,
    GROUP: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    m_block = tl.program_id(1)
    h = tl.program_id(2)
    kvh = h // GROUP
    q_start = tl.load(query_start_ptr + b).to(tl.int64)
    q_len = (tl.load(query_start_ptr + b + 1) - q_start).to(tl.int32)
    seq_len = tl.load(seq_lens_ptr + b)
    context = seq_len - q_len

    m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    row_mask = m < q_len
    d_mask = d < head_dim
    q = tl.load(
        q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :], other=0.0,
    ).to(tl.float32)
    q_pos = context + m

    # keys past the tile's last query position are causally invisible; a tile past the span does nothing
    hi = tl.minimum(seq_len, context + (m_block + 1) * BLOCK_M)
    hi = tl.where(m_block * BLOCK_M < q_len, hi, 0)
    # with a window, keys before the tile's first row's window are invisible to every row of it
    lo = tl.where(window > 0, tl.maximum(context + m_block * BLOCK_M - window + 1, 0), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    table = block_tables_ptr + b * stride_bt
    n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        k_pos = start + n
        k_valid = k_pos < hi
        blk = tl.load(table + k_pos // BLOCK_SIZE, mask=k_valid, other=0).to(tl.int64)
        off = k_pos % BLOCK_SIZE
        kv_mask = k_valid[:, None] & d_mask[None, :]
        k = tl.load(
            k_cache_ptr + blk[:, None] * stride_kb + off[:, None] * stride_ks + kvh * stride_kh + d[None, :],
            mask=kv_mask, other=0.0,
        ).to(tl.float32)
        v = tl.load(
            v_cache_ptr + blk[:, None] * stride_vb + off[:, None] * stride_vs + kvh * stride_vh + d[None, :],
            mask=kv_mask, other=0.0,
        ).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # [M, N]
        if SOFTCAP:
            s = softcap_log2(s, softcap)
        visible = k_valid[None, :] & (k_pos[None, :] <= q_pos[:, None])
        visible = visible & ((window <= 0) | (k_pos[None, :] > q_pos[:, None] - window))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row may see nothing in a tile yet (a window starts later): keep its max finite
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :],
    )


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D] flattened query spans
    k_cache: torch.Tensor,  # [num_blocks, block_size, KVH, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_start_loc: list[int] | torch.Tensor,  # [B + 1]
    seq_lens: list[int] | torch.Tensor,  # [B]
    scale: float,
    key: torch.Tensor | None = None,
    value: torch.Tensor | None = None,
    *,
    max_query_len: int | None = None,
    out: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Causal attention of variable-length query spans over their paged context. Returns [T, H, D].

    Every K/V, this step's included, is read from the cache; ``key``/``value`` exist for signature parity
    with the torch reference (which uses them as a shortcut) and are not read. Pass ``max_query_len`` (host
    int) when the spans are a device tensor, to avoid a sync. Rows of ``out`` outside the spans are left
    untouched.
    """
    t, h, d = query.shape
    _, block_size, kvh, _ = k_cache.shape
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} KV heads")
    for x in (query, k_cache, v_cache):
        if x.stride(-1) != 1:
            raise ValueError("paged_prefill_attention needs the head dim contiguous")
    if out is None:
        out = torch.empty_like(query)
    if isinstance(query_start_loc, torch.Tensor):
        qsl = query_start_loc.to(device=query.device, dtype=torch.int32)
    else:
        if max_query_len is None:
            max_query_len = max((e - s for s, e in zip(query_start_loc[:-1], query_start_loc[1:])), default=0)
        qsl = torch.tensor(query_start_loc, dtype=torch.int32, device=query.device)
    if not isinstance(seq_lens, torch.Tensor):
        seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=query.device)
    num_reqs = qsl.shape[0] - 1
    if max_query_len is None:
        max_query_len = int((qsl[1:] - qsl[:-1]).max()) if num_reqs > 0 else 0
    if t == 0 or num_reqs == 0 or max_query_len == 0:
        return out
    precision = dot_precision(query.dtype, k_cache.dtype)
    block_m, block_n, num_warps = launch_config(d, fp32=precision == "ieee")
    grid = (num_reqs, triton.cdiv(max_query_len, block_m), h)
    _prefill_kernel[grid](
        query, k_cache, v_cache, block_tables, qsl, seq_lens, out,
        scale if softcap > 0 else scale * LOG2E, int(window), float(softcap),
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        d,
        GROUP=h // kvh, BLOCK_D=next_pow2(d), BLOCK_SIZE=block_size,
        BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=precision, SOFTCAP=softcap > 0,
        num_warps=num_warps,
    )
    return out
