"""Pure-torch versions of the engine's kernels.

They are the reference the Triton kernels are tested against, and the CPU fast path: no
per-token Python loops; decode attention is batched over requests, prefill attention loops
over the (few) prefilling requests of a step and runs one fused SDPA call each.

Cache layout: ``[num_blocks, block_size, num_kv_heads, head_dim]``; slot = block * block_size + offset.
The attention functions take ``load``, which turns gathered cache rows into K/V values (an int8
cache's dequantization: engine/attention/kv_format.py); None reads the rows as they are.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def write_kv(
    key: torch.Tensor,  # [T, KVH, D]
    value: torch.Tensor,  # [T, KVH, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int64; -1 = skip
) -> None:
    """Stores the new tokens' K/V at their slots; slots of -1 (padding) are skipped."""
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    slots = slot_mapping.long()
    valid = slots >= 0
    if not bool(valid.all()):
        slots, key, value = slots[valid], key[valid], value[valid]
    k_cache.view(-1, kvh, d).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slots, value.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """Returns the first ``length`` tokens of one request's cache as ``[length, KVH, D]``."""
    bs = cache.shape[1]
    nblocks = (length + bs - 1) // bs
    blocks = cache.index_select(0, block_table[:nblocks].long())
    return blocks.flatten(0, 1)[:length]


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D], one query token per request
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    seq_lens: torch.Tensor,  # [B] int32 (includes the query token, whose K/V is already in cache)
    scale: float,
    max_seq_len: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
    load: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention of one token per request over its paged context (its last ``window`` keys when
    ``window`` > 0; scores soft-capped as ``softcap * tanh(s / softcap)`` when ``softcap`` > 0).
    Returns [B, H, D]."""
    b, h, d = query.shape
    _, bs, kvh, _ = k_cache.shape
    group = h // kvh
    load = load or (lambda rows: rows)
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    nblocks = (max_seq_len + bs - 1) // bs
    tables = block_tables[:, :nblocks].long()
    # [B, nblocks, bs, KVH, D] -> [B, KVH, L, D]
    k = load(k_cache[tables]).flatten(1, 2).transpose(1, 2)
    v = load(v_cache[tables]).flatten(1, 2).transpose(1, 2)
    length = k.shape[2]
    kpos = torch.arange(length, device=query.device)[None, :]
    valid = kpos < seq_lens[:, None].long()
    if window > 0:
        valid = valid & (kpos >= seq_lens[:, None].long() - window)
    mask = valid[:, None, None, :]  # [B, 1, 1, L]
    # GQA: the `group` query heads of one KV head become `group` query rows of that head
    q = query.view(b, kvh, group, d).to(k.dtype)
    out = attend(q, k, v, mask, scale, softcap)
    return out.reshape(b, h, d).to(query.dtype)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D] flattened query spans
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks]
    query_start_loc: list[int] | torch.Tensor,  # [B + 1]
    seq_lens: list[int] | torch.Tensor,  # [B]
    scale: float,
    key: torch.Tensor | None = None,  # [T, KVH, D] new keys (used when a span has no cached context)
    value: torch.Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
    load: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Causal attention of variable-length query spans over their paged context.

    The K/V of the query tokens must already be in the cache. Query token j of request i sits at
    position ``p = seq_lens[i] - q_len_i + j`` and sees every key up to and including that position;
    with ``window`` > 0 only the keys at positions > ``p - window`` (its last ``window`` keys, as
    Hugging Face's sliding-window mask). ``softcap`` as in :func:`paged_decode_attention`.
    """
    if isinstance(query_start_loc, torch.Tensor):
        query_start_loc = query_start_loc.tolist()
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.tolist()
    out = torch.empty_like(query)
    h = query.shape[1]
    kvh = k_cache.shape[2]
    load = load or (lambda rows: rows)
    for i, seq_len in enumerate(seq_lens):
        start, end = query_start_loc[i], query_start_loc[i + 1]
        q_len = end - start
        if q_len == 0:
            continue
        context = seq_len - q_len
        if context == 0 and key is not None:
            k, v = key[start:end], value[start:end]
        else:
            k = load(gather_kv(k_cache, block_tables[i], seq_len))
            v = load(gather_kv(v_cache, block_tables[i], seq_len))
        q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
        k = k.transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, L, D]
        v = v.transpose(0, 1).unsqueeze(0).to(q.dtype)
        if context == 0 and window <= 0 and softcap <= 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=h != kvh)
        else:
            qpos = torch.arange(context, seq_len, device=query.device)
            kpos = torch.arange(seq_len, device=query.device)
            mask = kpos[None, :] <= qpos[:, None]
            if window > 0:
                mask = mask & (kpos[None, :] > qpos[:, None] - window)
            if softcap <= 0:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != kvh)
            else:  # GQA as broadcasting: q [KVH, group, q, D] against k/v [KVH, 1, L, D]
                qg = q.reshape(kvh, h // kvh, q_len, -1)
                o = attend(qg, k[0][:, None], v[0][:, None], mask, scale, softcap).reshape(1, h, q_len, -1)
        out[start:end] = o[0].transpose(0, 1)
    return out


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
           softcap: float = 0.0) -> torch.Tensor:
    """softmax(scores + mask) @ v with ``scores = q @ k^T * scale``, soft-capped to
    ``softcap * tanh(scores / softcap)`` when ``softcap`` > 0 (Gemma 2); k/v broadcast over q's
    leading dims. Fused SDPA without a cap; the cap needs the explicit scores."""
    if softcap <= 0:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2).to(q.dtype)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1).to(v.dtype), v)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm as Llama defines it (computed in fp32). With ``residual``, first adds it to ``x`` and
    returns ``(normed, x + residual)``: the new residual stream."""
    if residual is not None:
        x = x + residual
        residual = x
    # aten's fused rms_norm: one pass, the same fp32 arithmetic as x * rsqrt(mean(x^2) + eps)
    normed = F.rms_norm(x.float(), (x.shape[-1],), None, eps)
    normed = weight * normed.to(x.dtype)
    return normed if residual is None else (normed, residual)


def rotary_cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token factors for :func:`apply_rotary_`: ``cos`` repeated over both halves and ``sin`` with
    the first half negated, each ``[T, 1, D]``. Computed once per step, shared by every layer."""
    half = cos_sin_cache.shape[1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())
    cos, sin = cs[:, :half], cs[:, half:]
    return torch.cat((cos, cos), -1)[:, None], torch.cat((-sin, sin), -1)[:, None]


def apply_rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates ``x`` [T, H, D] in place in the rotate-half layout:
    ``x * cos + rotate_half(x) * sin`` with rotate_half(x) = (-x2, x1), the sign folded into ``sin``."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), -1).float()
    if x.dtype == torch.float32:
        return x.mul_(cos).addcmul_(swapped, sin)
    x.copy_((x.float() * cos).addcmul_(swapped, sin))
    return x


def rotary_embedding(
    positions: torch.Tensor,  # [T]
    query: torch.Tensor,  # [T, H, D]
    key: torch.Tensor,  # [T, KVH, D]
    cos_sin_cache: torch.Tensor,  # [max_pos, D]: cos in the first D/2 columns, sin in the rest
) -> tuple[torch.Tensor, torch.Tensor]:
    """Applies rotary embedding in the rotate-half (GPT-NeoX / Hugging Face Llama) layout, in place."""
    cos, sin = rotary_cos_sin(positions, cos_sin_cache)
    return apply_rotary_(query, cos, sin), apply_rotary_(key, cos, sin)
