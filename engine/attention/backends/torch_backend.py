"""The CPU attention backend: batched decode over gathered blocks, one SDPA call per prefill.

Decode requests are planned once per step (``prepare``): grouped by context length so that padding
to the longest context of a group wastes at most half of what is gathered, with their block ids
flattened. Every layer then gathers each group's K/V blocks into a workspace that lives as long as
the backend: a fresh multi-MB tensor per layer would cost more in page faults than the copy itself.
The cache's format (engine/attention/kv_format.py) turns new K/V into rows and gathered rows back
into values.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.backends.base import AttentionBackend
from engine.attention.kv_format import KVCacheFormat
from engine.attention.metadata import AttentionMetadata
from engine.kernels import torch_ref


@dataclass
class DecodeGroup:
    rows: torch.Tensor | None  # decode rows of this group; None = all decode rows, in order
    num_rows: int
    block_ids: torch.Tensor  # [num_rows * num_blocks] int64, row-major
    num_blocks: int
    length: int  # keys attended per row (padded to the group's longest context)
    mask: torch.Tensor | None  # [num_rows, 1, 1, length] bool; None when nothing is padded
    lens: torch.Tensor  # [num_rows] int64 context lengths (for sliding-window masks)


def plan_decode_groups(meta: AttentionMetadata, max_waste: float = 0.5) -> list[DecodeGroup]:
    """Splits the step's decode requests into groups of similar context length."""
    nd = meta.num_decodes
    if nd == 0:
        return []
    bs = meta.block_size
    lens = meta.seq_lens_host[:nd]
    order = sorted(range(nd), key=lambda i: -lens[i])
    spans: list[list[int]] = [[order[0]]]
    for i in order[1:]:
        if lens[i] < (1 - max_waste) * lens[spans[-1][0]]:
            spans.append([])
        spans[-1].append(i)
    tables = meta.block_tables
    groups = []
    for rows in spans:
        longest = lens[rows[0]]
        nblocks = -(-longest // bs)
        in_order = len(spans) == 1 and rows == sorted(rows)
        rows_t = None if in_order else torch.tensor(rows, dtype=torch.int64, device=tables.device)
        sub = tables[:nd] if rows_t is None else tables.index_select(0, rows_t)
        row_lens = [lens[i] for i in rows]
        lens_t = torch.tensor(row_lens, dtype=torch.int64, device=tables.device)
        if all(n == longest for n in row_lens):
            length, mask = longest, None  # no padding: attend over exactly the context
        else:
            length = nblocks * bs
            mask = (torch.arange(length, device=tables.device)[None, :] < lens_t[:, None])[:, None, None, :]
        groups.append(DecodeGroup(rows_t, len(rows), sub[:, :nblocks].reshape(-1).long(), nblocks, length, mask,
                                  lens_t))
    return groups


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def __init__(self, kv: KVCacheFormat | None = None) -> None:
        self.kv = kv or KVCacheFormat(torch.float32)  # "auto" stores rows in whatever dtype the cache has
        self._planned_for: AttentionMetadata | None = None  # held, so its id cannot be reused
        self._groups: list[DecodeGroup] = []
        self._workspace: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers(self, cache: torch.Tensor, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (tuple(cache.shape[1:]), cache.dtype, cache.device)
        ws = self._workspace.get(key)
        if ws is None or ws[0].shape[0] < num_blocks:
            n = max(num_blocks, 2 * ws[0].shape[0] if ws is not None else 0)
            ws = (cache.new_empty((n, *cache.shape[1:])), cache.new_empty((n, *cache.shape[1:])))
            self._workspace[key] = ws
        return ws[0][:num_blocks], ws[1][:num_blocks]

    def _decode(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float,
                out: torch.Tensor, window: int = 0, softcap: float = 0.0) -> None:
        _, bs, kvh, row = k_cache.shape
        d = query.shape[2]
        group = query.shape[1] // kvh
        for g in self._groups:
            k_buf, v_buf = self._buffers(k_cache, g.block_ids.numel())
            torch.index_select(k_cache, 0, g.block_ids, out=k_buf)
            torch.index_select(v_cache, 0, g.block_ids, out=v_buf)
            k = self.kv.load(k_buf.view(g.num_rows, g.num_blocks * bs, kvh, row)[:, : g.length]).transpose(1, 2)
            v = self.kv.load(v_buf.view(g.num_rows, g.num_blocks * bs, kvh, row)[:, : g.length]).transpose(1, 2)
            q = query if g.rows is None else query.index_select(0, g.rows)
            mask = g.mask
            if window > 0:  # a row sees its last `window` keys only
                in_window = torch.arange(g.length, device=k.device)[None, :] >= (g.lens - window)[:, None]
                mask = in_window[:, None, None, :] if mask is None else mask & in_window[:, None, None, :]
            # GQA: the `group` query heads of one KV head become `group` query rows of that head
            o = torch_ref.attend(q.view(g.num_rows, kvh, group, d).to(k.dtype), k, v, mask, scale, softcap)
            o = o.reshape(g.num_rows, -1, d).to(out.dtype)
            if g.rows is None:
                out.copy_(o)
            else:
                out.index_copy_(0, g.rows, o)

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
        torch_ref.write_kv(self.kv.store(key), self.kv.store(value), k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(query)
        nd = meta.num_decodes
        if meta is not self._planned_for:  # first layer of a step
            self._planned_for, self._groups = meta, plan_decode_groups(meta)
        if nd:
            self._decode(query[:nd], k_cache, v_cache, scale, out[:nd], window, softcap)
        if nd == meta.num_requests:
            return out
        qsl = meta.query_start_loc_host[nd:]
        base = qsl[0]
        out[base:] = torch_ref.paged_prefill_attention(
            query[base:],
            k_cache,
            v_cache,
            meta.block_tables[nd:],
            [x - base for x in qsl],
            meta.seq_lens_host[nd:],
            scale,
            key=self.kv.fresh(key[base:]),
            value=self.kv.fresh(value[base:]),
            window=window,
            softcap=softcap,
            load=self.kv.load,
        )
        return out
