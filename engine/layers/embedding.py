"""Vocabulary-parallel token embedding and LM head."""
from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed.parallel_state import get_tp_group
from engine.layers.quantization.base import LayerKind, LinearMethod, UnquantizedLinearMethod


class VocabParallelEmbedding(nn.Module):
    """Rank r holds rows [r * V/tp, (r + 1) * V/tp) of the (padded) vocabulary.

    With an int8 weight (a tied LM head quantized by ``quantization="int8"``) a lookup reads the
    int8 rows times their per-row scale."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.vocab_size = vocab_size
        self.shard_size = -(-vocab_size // tp.size)
        self.start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.weight_scale: torch.Tensor | None = None
        self.out_dtype = self.weight.dtype

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        part = loaded[self.start : self.start + self.shard_size]
        param.data.zero_()
        param.data[: part.shape[0]].copy_(part)

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
        if getattr(self, "gguf_type", None) is not None:  # GGUF blocks (quantization="gguf")
            from engine.layers.quantization.gguf import gguf_rows

            return gguf_rows(self, ids).to(self.out_dtype)
        if self.weight_scale is None:
            return F.embedding(ids, self.weight)
        from engine.layers.quantization.int8 import int8_rows

        rows = int8_rows(self.weight, ids)
        return rows.to(self.out_dtype) * self.weight_scale[ids].unsqueeze(-1).to(self.out_dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self._lookup(input_ids)
        local = input_ids - self.start
        mask = (local >= 0) & (local < self.shard_size)
        out = self._lookup(local.clamp(0, self.shard_size - 1)) * mask.unsqueeze(-1)
        return get_tp_group().all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Computes logits for the given hidden states only; shards are gathered on every rank."""

    quant_kind: ClassVar[LayerKind] = LayerKind.LM_HEAD  # what quantization.method_for dispatches on

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__(vocab_size, hidden)
        self.linear_method: LinearMethod = UnquantizedLinearMethod()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear_method.apply(self, hidden)
        if self.tp_size > 1:
            logits = get_tp_group().all_gather(logits, dim=-1)
        return logits[:, : self.vocab_size]
