"""Which attention heads each tensor-parallel rank holds.

The attention backends assume the standard contiguous grouping on every rank: local query head
``j`` reads local KV head ``j // (local_q / local_kv)``. When the head counts do not divide by the
number of ranks (SmolLM2: 9 query heads, 3 KV heads), heads are padded or replicated so that the
grouping stays uniform on each rank:

* ``num_kv_heads >= tp`` (or divisible): KV heads are padded up to a multiple of ``tp`` with dummy
  heads; rank r holds a contiguous run of KV heads, each with its whole group of query heads. A
  dummy KV head gets a group of dummy query heads. 9/3 on 2 ranks -> 12/4: rank 0 holds KV 0-1 with
  query heads 0-5, rank 1 holds KV 2 and a dummy with query heads 6-8 and three dummies.
* ``num_kv_heads < tp`` with ``tp % num_kv_heads == 0``: each KV head is replicated on
  ``tp / num_kv_heads`` ranks, which split its query group (padded to a multiple of the replicas).

Dummy heads have zero weights (query rows and the matching ``o_proj`` input columns), so the model's
output is unchanged; they cost compute and KV-cache memory on the ranks that hold them.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadLayout:
    """Source head index in the checkpoint for each local head; None marks a zero (dummy) head."""

    q_heads: tuple[int | None, ...]
    kv_heads: tuple[int | None, ...]

    @property
    def num_heads(self) -> int:
        return len(self.q_heads)

    @property
    def num_kv_heads(self) -> int:
        return len(self.kv_heads)

    @property
    def is_contiguous(self) -> bool:
        """True when both lists are runs ``start, start + 1, ...`` with no dummies (a plain narrow)."""
        return all(
            None not in heads and list(heads) == list(range(heads[0], heads[0] + len(heads)))
            for heads in (self.q_heads, self.kv_heads)
        )


def tp_head_layout(num_heads: int, num_kv_heads: int, tp_size: int, rank: int) -> HeadLayout:
    if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
    if not 0 <= rank < tp_size:
        raise ValueError(f"rank {rank} is outside the tensor-parallel group of size {tp_size}")
    group = num_heads // num_kv_heads

    def real(h: int, limit: int) -> int | None:
        return h if h < limit else None

    if num_kv_heads < tp_size and tp_size % num_kv_heads == 0:
        replicas = tp_size // num_kv_heads
        kv = rank // replicas
        per_rank = -(-group // replicas)  # the group padded to a multiple of the replicas
        part = rank % replicas
        q = [kv * group + i if i < group else None for i in range(part * per_rank, (part + 1) * per_rank)]
        return HeadLayout(tuple(q), (kv,))
    kv_per_rank = -(-num_kv_heads // tp_size)
    kv = [real(h, num_kv_heads) for h in range(rank * kv_per_rank, (rank + 1) * kv_per_rank)]
    q = [None if k is None else k * group + i for k in kv for i in range(group)]
    return HeadLayout(tuple(q), tuple(kv))
