"""Linear layers that shard their weight over the tensor-parallel group at load time.

Each parameter carries a ``weight_loader(param, loaded, shard_id=None)`` that copies this rank's
slice of a checkpoint tensor into it, so no rank ever holds the full matrix.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from engine.distributed.head_layout import tp_head_layout
from engine.layers.checkpoint import materialize
from engine.layers.quantization.base import LayerKind, LinearMethod, UnquantizedLinearMethod
from engine.distributed.parallel_state import get_tp_group


def divide(a: int, b: int) -> int:
    if a % b:
        raise ValueError(f"{a} is not divisible by the tensor-parallel size {b}")
    return a // b


class LinearBase(nn.Module):
    quant_kind: ClassVar[LayerKind] = LayerKind.LINEAR  # what quantization.method_for dispatches on

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.linear_method: LinearMethod = UnquantizedLinearMethod()

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        param.data.copy_(materialize(loaded))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_method.apply(self, x)


class ReplicatedLinear(LinearBase):
    pass


class ColumnParallelLinear(LinearBase):
    """Splits the output dimension: rank r holds rows [r * out/tp, (r + 1) * out/tp)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        super().__init__(in_features, divide(out_features, tp.size), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * size, size))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel matrices stacked (gate and up); each shard is split separately."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None = None) -> None:
        if shard_id is None:  # a fused checkpoint tensor (Phi-3's gate_up_proj): split it by output_sizes
            for i, size in enumerate(self.output_sizes):
                self.weight_loader(param, RowOffset(loaded, sum(self.output_sizes[:i]), size), i)
            return
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one matrix, split by heads. Head counts that do not divide by the
    number of ranks are padded with zero heads or replicated (engine/distributed/head_layout.py)."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.head_dim = head_dim
        self.layout = tp_head_layout(num_heads, num_kv_heads, tp.size, tp.rank)
        self.total_heads, self.total_kv_heads = num_heads, num_kv_heads
        self.num_heads = self.layout.num_heads
        self.num_kv_heads = self.layout.num_kv_heads
        LinearBase.__init__(self, hidden, (self.num_heads + 2 * self.num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:  # a fused checkpoint tensor (Phi-3's qkv_proj): q, k, v rows in turn
            q_rows, kv_rows = self.total_heads * self.head_dim, self.total_kv_heads * self.head_dim
            for sid, start, rows in (("q", 0, q_rows), ("k", q_rows, kv_rows), ("v", q_rows + kv_rows, kv_rows)):
                self.weight_loader(param, RowOffset(loaded, start, rows), sid)
            return
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, heads = 0, self.layout.q_heads
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            heads = self.layout.kv_heads
        copy_heads(param.data, loaded, 0, offset, heads, self.head_dim)


class RowParallelLinear(LinearBase):
    """Splits the input dimension; partial products are summed with an all-reduce.

    With ``input_heads`` (o_proj), rank r holds the input columns of the attention heads its
    QKVParallelLinear holds, in the same order, with zero columns for padded heads."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        input_heads: tuple[int | None, ...] | None = None,
        head_dim: int | None = None,
    ) -> None:
        tp = get_tp_group()
        self.tp_rank, self.tp_size = tp.rank, tp.size
        self.input_heads, self.head_dim = input_heads, head_dim
        local_in = len(input_heads) * head_dim if input_heads is not None else divide(in_features, tp.size)
        super().__init__(local_in, out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        if param.dim() == 1:  # bias: added once, on rank 0
            if self.tp_rank == 0:
                param.data.copy_(materialize(loaded))
            else:
                param.data.zero_()
            return
        if self.input_heads is not None:
            copy_heads(param.data, loaded, 1, 0, self.input_heads, self.head_dim)
            return
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_tp_group().all_reduce(self.linear_method.apply(self, x))


class RowOffset:
    """Rows [start, start + rows) of a (lazily read) checkpoint tensor, for loaders that split a
    fused tensor: narrowing it reads only the part asked for."""

    def __init__(self, source, start: int, rows: int) -> None:
        self.source, self.start = source, start
        self.shape = (rows, *source.shape[1:])

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        if dim % self.dim() == 0:
            return self.source.narrow(0, self.start + start, length)
        return self.source.narrow(0, self.start, self.shape[0]).narrow(dim, start, length)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        start, stop, _ = rows.indices(self.shape[0])
        return self.narrow(0, start, max(stop - start, 0))


def copy_heads(
    dst: torch.Tensor, src: torch.Tensor, dim: int, offset: int, heads: tuple[int | None, ...], head_dim: int
) -> None:
    """Copies head ``heads[j]`` of ``src`` (``head_dim`` rows or columns along ``dim``) into slot ``j``
    of ``dst`` starting at ``offset``; a None head is zero-filled."""
    real = [h for h in heads if h is not None]
    if len(real) == len(heads) and real == list(range(real[0], real[0] + len(real))):
        n = len(heads) * head_dim
        dst.narrow(dim, offset, n).copy_(src.narrow(dim, real[0] * head_dim, n))
        return
    for j, h in enumerate(heads):
        out = dst.narrow(dim, offset + j * head_dim, head_dim)
        if h is None:
            out.zero_()
        else:
            out.copy_(src.narrow(dim, h * head_dim, head_dim))
