"""How K/V sit in the paged cache: the model's dtype (``kv_cache_dtype="auto"``) or int8.

An int8 cache row is one token's one KV head: ``head_dim`` int8 values and then their fp32 scale in
4 more bytes, so a cache tensor is ``[num_blocks, block_size, num_kv_heads, head_dim + 4]`` int8 and
a block carries its own scales. Every block operation (prefix sharing, copy-on-write, swapping,
tensor-parallel head shards) moves rows without knowing what is in them.

Quantization is symmetric, one scale per token per head: ``scale = max|x| / 127`` and
``q = round(x / scale)`` (round half to even; a row of zeros keeps scale 1). Reading returns
``q * scale`` in fp32. The C kernels (engine/kernels/cpu/fp32_cpu.c) compute the same bits as
:meth:`Int8KVFormat.store` and :meth:`Int8KVFormat.load`, so the CPU and torch backends attend to
the same values. Every query attends to what is stored, its own step's keys included: a prefill
reads its new keys back from the cache, so the result does not depend on how the prompt was chunked
or whether its prefix was cached.
"""
from __future__ import annotations

import torch

KV_CACHE_DTYPES = ("auto", "int8")
SCALE_BYTES = 4  # the fp32 scale after each int8 row


class KVCacheFormat:
    """The model's own dtype: rows stored and read as they are."""

    name = "auto"
    exact = True  # reads return exactly what was written

    def __init__(self, model_dtype: torch.dtype) -> None:
        self.model_dtype = model_dtype

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.model_dtype

    def row_width(self, head_dim: int) -> int:
        """Elements of the cache's last dimension for one token's one KV head."""
        return head_dim

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
        return (num_blocks, block_size, num_kv_heads, self.row_width(head_dim))

    def bytes_per_block(self, block_size: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes of one layer's K and V for one block."""
        elem = torch.empty((), dtype=self.cache_dtype).element_size()
        return 2 * block_size * num_kv_heads * self.row_width(head_dim) * elem

    def store(self, x: torch.Tensor) -> torch.Tensor:
        """New K or V ``[T, KVH, D]`` as the cache rows to write."""
        return x

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        """Cache rows ``[..., row_width]`` as K or V values ``[..., D]``."""
        return rows

    def fresh(self, x: torch.Tensor) -> torch.Tensor | None:
        """What a prefill with no cached context may attend to instead of reading its keys back from
        the cache: the step's own K or V when the cache is exact; None (read the cache) otherwise."""
        return x


class Int8KVFormat(KVCacheFormat):
    """int8 values with one fp32 scale per token per KV head (the module docstring)."""

    name = "int8"
    exact = False

    @property
    def cache_dtype(self) -> torch.dtype:
        return torch.int8

    def row_width(self, head_dim: int) -> int:
        return head_dim + SCALE_BYTES

    def store(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        amax = x.abs().amax(dim=-1, keepdim=True)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
        return torch.cat([q, scale.contiguous().view(torch.int8)], dim=-1)

    def load(self, rows: torch.Tensor) -> torch.Tensor:
        d = rows.shape[-1] - SCALE_BYTES
        scale = rows[..., d:].contiguous().view(torch.float32)
        return rows[..., :d].to(torch.float32) * scale

    def fresh(self, x: torch.Tensor) -> torch.Tensor | None:
        return None


def make_kv_format(kv_cache_dtype: str, model_dtype: torch.dtype) -> KVCacheFormat:
    """The format for an ``EngineArgs.kv_cache_dtype`` value (validated there)."""
    if kv_cache_dtype == "auto":
        return KVCacheFormat(model_dtype)
    if kv_cache_dtype == "int8":
        return Int8KVFormat(model_dtype)
    raise ValueError(f"kv_cache_dtype must be one of {', '.join(map(repr, KV_CACHE_DTYPES))}, got {kv_cache_dtype!r}")
