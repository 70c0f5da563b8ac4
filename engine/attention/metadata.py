"""Per-step attention metadata, built once by the model runner and read by every layer."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Describes one flattened step batch.

    Requests are ordered decodes first (query length 1), then prefills / prefill chunks.
    Token ``t`` of the flattened batch belongs to request ``i`` where
    ``query_start_loc[i] <= t < query_start_loc[i + 1]``; its position in the sequence is
    ``seq_lens[i] - query_len_i + (t - query_start_loc[i])``.

    KV caches are laid out ``[num_blocks, block_size, num_kv_heads, head_dim]``; a slot is
    ``block_id * block_size + offset``. ``block_tables`` rows are padded with 0 past the
    request's last block; kernels must mask by ``seq_lens``.
    """

    slot_mapping: torch.Tensor  # [T] int64, -1 = padded token (not written)
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32, context length after this step's tokens
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int  # the first num_decodes requests have exactly one query token
    max_query_len: int
    max_seq_len: int
    max_decode_seq_len: int  # longest context among the decode requests (0 when none)
    block_size: int
    # host-side copies for backends that loop over prefills (the torch CPU path)
    query_start_loc_host: list[int]
    seq_lens_host: list[int]

    @property
    def num_requests(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes

    @property
    def num_prefills(self) -> int:
        return self.num_requests - self.num_decodes


_CURRENT: AttentionMetadata | None = None


def set_attention_metadata(meta: AttentionMetadata | None) -> None:
    """Installs the metadata for the step about to run (the model layers read it)."""
    global _CURRENT
    _CURRENT = meta


def get_attention_metadata() -> AttentionMetadata:
    if _CURRENT is None:
        raise RuntimeError("attention metadata is not set: the model must be run through ModelRunner")
    return _CURRENT
