"""The worker-side pooler: picks, from a step's hidden states, what each pooling request keeps.

One object per runner, chosen at start-up from the pooling type. A pooling request runs its
prompt in one or more prefill chunks and samples nothing; when its last chunk has run, the pooler
returns its pooled hidden state (fp32, on the host). MEAN and CLS keep per-request state across
chunks (a running sum, the first position); LAST needs only the final position.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from engine.pooling.config import PoolerConfig, PoolingType


@dataclass
class PoolingRow:
    """One scheduled pooling request in a step: its rows ``[begin, end)`` of the hidden states."""

    req_id: str
    begin: int
    end: int
    start_position: int  # of its first scheduled token
    num_prompt_tokens: int

    @property
    def is_last_chunk(self) -> bool:
        return self.start_position + (self.end - self.begin) >= self.num_prompt_tokens


def pooling_rows(req_ids: list[str], num_computed: list[int], query_start_loc: list[int],
                 states: Mapping[str, Any]) -> list[PoolingRow]:
    """The step's rows that belong to pooling requests (``states[rid].pooling_params`` set)."""
    rows = []
    for i, rid in enumerate(req_ids):
        state = states[rid]
        if state.pooling_params is not None:
            rows.append(PoolingRow(rid, query_start_loc[i], query_start_loc[i + 1], num_computed[i],
                                   len(state.prompt_token_ids)))
    return rows


class Pooler(ABC):
    pooling_type: PoolingType

    def pool(self, hidden: torch.Tensor, rows: list[PoolingRow]) -> dict[str, torch.Tensor]:
        """req id -> pooled hidden state [hidden_size] (fp32, host) for each row whose prompt is done."""
        out = {}
        for row in rows:
            pooled = self._pool_row(hidden, row)
            if row.is_last_chunk:
                out[row.req_id] = pooled.float().cpu()
        return out

    @abstractmethod
    def _pool_row(self, hidden: torch.Tensor, row: PoolingRow) -> torch.Tensor | None:
        """Takes in this chunk; returns the pooled state when it is the last chunk."""

    def forget(self, req_ids: set[str]) -> None:
        """Drops state of finished requests (aborted ones may have stopped mid-prompt)."""


class LastPooler(Pooler):
    pooling_type = PoolingType.LAST

    def _pool_row(self, hidden: torch.Tensor, row: PoolingRow) -> torch.Tensor | None:
        return hidden[row.end - 1] if row.is_last_chunk else None


class ClsPooler(Pooler):
    """The first position's hidden state (kept from the first chunk until the last one runs)."""

    pooling_type = PoolingType.CLS

    def __init__(self) -> None:
        self._first: dict[str, torch.Tensor] = {}

    def _pool_row(self, hidden: torch.Tensor, row: PoolingRow) -> torch.Tensor | None:
        if row.start_position == 0:  # (again, after a preemption that dropped its KV)
            self._first[row.req_id] = hidden[row.begin].clone()
        return self._first.pop(row.req_id) if row.is_last_chunk else None

    def forget(self, req_ids: set[str]) -> None:
        for rid in req_ids:
            self._first.pop(rid, None)


class MeanPooler(Pooler):
    """The mean over every prompt position: a running fp32 sum over the chunks."""

    pooling_type = PoolingType.MEAN

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def _pool_row(self, hidden: torch.Tensor, row: PoolingRow) -> torch.Tensor | None:
        part = hidden[row.begin : row.end].float().sum(dim=0)
        if row.start_position == 0:
            self._sums[row.req_id] = part
        else:
            self._sums[row.req_id] = self._sums[row.req_id] + part
        if not row.is_last_chunk:
            return None
        return self._sums.pop(row.req_id) / row.num_prompt_tokens

    def forget(self, req_ids: set[str]) -> None:
        for rid in req_ids:
            self._sums.pop(rid, None)


_POOLERS: dict[PoolingType, type[Pooler]] = {
    PoolingType.LAST: LastPooler,
    PoolingType.MEAN: MeanPooler,
    PoolingType.CLS: ClsPooler,
}


def make_pooler(config: PoolerConfig | None) -> Pooler:
    return _POOLERS[(config or PoolerConfig()).pooling_type]()
