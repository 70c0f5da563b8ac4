"""The tensor-parallel group of this process. With one rank every collective is a no-op."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TPGroup:
    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            torch.distributed.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenates each rank's ``x`` along ``dim`` (every rank gets the result)."""
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=dim)


_TP = TPGroup()


def set_tp_group(rank: int, size: int) -> None:
    global _TP
    _TP = TPGroup(rank, size)


def get_tp_group() -> TPGroup:
    return _TP
