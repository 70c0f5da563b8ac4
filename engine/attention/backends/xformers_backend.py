"""Optional CUDA backend: prefill through xformers' memory-efficient attention, decode through the Triton
paged kernel. xformers is an optional extra: it is imported only when this backend is built, and its
absence surfaces as a clear error from the selector, never at import time of the engine."""
from __future__ import annotations

from typing import Any

import torch

from engine.attention.backends.base import AttentionBackend
from engine.attention.backends.triton_backend import TritonAttentionBackend
from engine.attention.metadata import AttentionMetadata
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.kv_write import write_kv
from engine.kernels.torch_ref import gather_kv


def load_xformers() -> tuple[Any, Any]:
    """Returns (memory_efficient_attention_forward, BlockDiagonalCausalFromBottomRightMask).

    Raises ImportError when xformers (or that API) is missing."""
    import xformers.ops as xops
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalFromBottomRightMask

    return xops.memory_efficient_attention_forward, BlockDiagonalCausalFromBottomRightMask


def xformers_available() -> bool:
    try:
        load_xformers()
    except ImportError:
        return False
    return True


class XFormersAttentionBackend(AttentionBackend):
    name = "xformers"

    def __init__(self, xformers_api: tuple[Any, Any] | None = None) -> None:
        # the api can be injected (tests substitute a torch implementation of the same contract)
        self._attend, self._mask_cls = xformers_api if xformers_api is not None else load_xformers()
        self._triton = TritonAttentionBackend()

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int = 0,
        softcap: float = 0.0,
    ) -> torch.Tensor:
        if window > 0 or softcap > 0:  # not in xformers' mask: the Triton kernels take these layers
            return self._triton.forward(query, key, value, k_cache, v_cache, meta, scale, window, softcap)
        write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        nd = meta.num_decodes
        if nd:
            paged_decode_attention(
                query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                max_seq_len=meta.max_decode_seq_len, out=out[:nd],
            )
        if meta.num_prefills:
            qsl = meta.query_start_loc_host
            out[qsl[nd] : qsl[-1]] = self._prefill(query[qsl[nd] : qsl[-1]], k_cache, v_cache, meta, scale)
        end = meta.query_start_loc_host[-1]
        if end < query.shape[0]:
            out[end:].zero_()  # padded tokens: keep them finite for the layers that follow
        return out

    def _prefill(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
    ) -> torch.Tensor:
        """One xformers call over all prefill spans: their whole contexts are gathered from the cache into
        one flat key sequence and a block-diagonal mask, causal from the bottom right, makes query j of a
        span with context c see keys 0..c+j of its own request only."""
        nd = meta.num_decodes
        qsl = meta.query_start_loc_host
        q_lens = [e - s for s, e in zip(qsl[nd:-1], qsl[nd + 1 :])]
        kv_lens = meta.seq_lens_host[nd:]
        keys = torch.cat([gather_kv(k_cache, meta.block_tables[nd + i], n) for i, n in enumerate(kv_lens)])
        values = torch.cat([gather_kv(v_cache, meta.block_tables[nd + i], n) for i, n in enumerate(kv_lens)])
        t, h, d = query.shape
        kvh = keys.shape[1]
        g = h // kvh
        # GQA as xformers' 5-D [batch, seq, kv_group, heads_per_group, dim] layout; K/V broadcast by expand
        q5 = query.view(1, t, kvh, g, d)
        k5 = keys.to(query.dtype).view(1, -1, kvh, 1, d).expand(-1, -1, -1, g, -1)
        v5 = values.to(query.dtype).view(1, -1, kvh, 1, d).expand(-1, -1, -1, g, -1)
        bias = self._mask_cls.from_seqlens(q_seqlen=q_lens, kv_seqlen=kv_lens)
        o = self._attend(q5, k5, v5, attn_bias=bias, scale=scale)
        return o.reshape(t, h, d)
