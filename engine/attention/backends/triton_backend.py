"""The CUDA attention backend: Triton KV write, then the paged decode kernel for the step's decode requests
and the prefill kernel for the rest (also usable on CPU tensors under ``TRITON_INTERPRET=1``)."""
from __future__ import annotations

import torch

from engine.attention.backends.base import AttentionBackend, StepReplay
from engine.attention.metadata import AttentionMetadata
from engine.kernels.decode_attention import paged_decode_attention
from engine.kernels.kv_write import write_kv
from engine.kernels.prefill_attention import paged_prefill_attention


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    step_replay = StepReplay.CUDA_GRAPH

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
        write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        nd = meta.num_decodes
        if nd:
            paged_decode_attention(
                query[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                max_seq_len=meta.max_decode_seq_len, out=out[:nd], window=window, softcap=softcap,
            )
        if meta.num_prefills:
            self._prefill(query, k_cache, v_cache, meta, scale, out, window, softcap)
        end = meta.query_start_loc_host[-1]
        if end < query.shape[0]:
            out[end:].zero_()  # padded tokens: keep them finite for the layers that follow
        return out

    @staticmethod
    def _prefill(
        query: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        out: torch.Tensor,
        window: int = 0,
        softcap: float = 0.0,
    ) -> None:
        """Runs the prefill kernel on the requests after the decodes; their query offsets stay absolute
        into the flattened batch, so the kernel reads and writes ``query``/``out`` in place."""
        nd = meta.num_decodes
        qsl = meta.query_start_loc_host
        max_q = max(e - s for s, e in zip(qsl[nd:-1], qsl[nd + 1 :]))
        paged_prefill_attention(
            query, k_cache, v_cache, meta.block_tables[nd:], meta.query_start_loc[nd:], meta.seq_lens[nd:],
            scale, max_query_len=max_q, out=out, window=window, softcap=softcap,
        )
