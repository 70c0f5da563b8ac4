"""Per-step attention metadata: built by ``build_attention_metadata`` (or, for replayed decode steps,
over the graph runners' static buffers) and read by every layer inside ``attention_context``."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def build_attention_metadata(
    query_lens: list[int], num_computed: list[int], block_tables: list[list[int]], block_size: int,
    device: torch.device, num_decodes: int | None = None,
) -> tuple[AttentionMetadata, torch.Tensor]:
    """The one builder of a step's metadata from a host-side description of the batch: request
    ``i`` computes ``query_lens[i]`` tokens from position ``num_computed[i]`` through the blocks
    ``block_tables[i]``. Returns the metadata and every token's position (both on ``device``).
    ``num_decodes`` defaults to the leading requests with one query token."""
    num_reqs = len(query_lens)
    max_blocks = max(len(t) for t in block_tables)
    tables = torch.zeros((num_reqs, max_blocks), dtype=torch.int32)
    for i, t in enumerate(block_tables):
        tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    counts_t = torch.tensor(query_lens, dtype=torch.int64)
    starts_t = torch.tensor(num_computed, dtype=torch.int64)
    qsl = torch.zeros(num_reqs + 1, dtype=torch.int64)
    torch.cumsum(counts_t, 0, out=qsl[1:])
    total = int(qsl[-1])
    req_of_token = torch.repeat_interleave(torch.arange(num_reqs), counts_t)
    positions = torch.arange(total) - qsl[:-1][req_of_token] + starts_t[req_of_token]
    slot_mapping = tables[req_of_token, positions // block_size].long() * block_size + positions % block_size
    seq_lens = starts_t + counts_t
    seq_lens_host = seq_lens.tolist()
    if num_decodes is None:
        num_decodes = 0
        while num_decodes < num_reqs and query_lens[num_decodes] == 1:
            num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=slot_mapping.to(device),
        query_start_loc=qsl.to(torch.int32).to(device),
        seq_lens=seq_lens.to(torch.int32).to(device),
        block_tables=tables.to(device),
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens_host),
        max_decode_seq_len=max(seq_lens_host[:num_decodes]) if num_decodes else 0,
        block_size=block_size,
        query_start_loc_host=qsl.tolist(),
        seq_lens_host=seq_lens_host,
    )
    return meta, positions.to(device)


_CURRENT: AttentionMetadata | None = None


@contextmanager
def attention_context(meta: AttentionMetadata) -> Iterator[AttentionMetadata]:
    """Installs ``meta`` for the model layers while the block runs (a forward pass, a capture or
    a recording), and clears it after, whatever happens."""
    global _CURRENT
    previous, _CURRENT = _CURRENT, meta
    try:
        yield meta
    finally:
        _CURRENT = previous


def get_attention_metadata() -> AttentionMetadata:
    if _CURRENT is None:
        raise RuntimeError("attention metadata is not set: run the model inside attention_context(meta)")
    return _CURRENT
