"""What weight loaders receive: a checkpoint tensor that is read from disk only where it is sliced.

Under tensor parallelism each rank's loader narrows a checkpoint tensor to its own rows or columns;
handing it a :class:`CheckpointSlice` instead of the whole tensor means a rank reads only those
bytes, so no rank ever holds a full sharded matrix, not even for a moment.
"""
from __future__ import annotations

from typing import Any

import torch


class CheckpointSlice:
    """A lazily read safetensors tensor supporting the operations loaders use: ``shape``, ``dim()``,
    ``narrow(dim, start, length)`` and row slicing ``x[a:b]``; anything else goes through
    :func:`materialize`. Every read is converted to ``dtype`` and counted in ``bytes_read``."""

    def __init__(self, source: Any, dtype: torch.dtype) -> None:
        self._source = source  # a safetensors PySafeSlice
        self.shape = torch.Size(source.get_shape())
        self.dtype = dtype
        self.bytes_read = 0

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        dim = dim % self.dim()
        index = [slice(None)] * self.dim()
        index[dim] = slice(start, start + length)
        out = self._source[tuple(index)].to(self.dtype)
        self.bytes_read += out.numel() * out.element_size()
        return out

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("a CheckpointSlice supports contiguous row slices only")
        start, stop, _ = rows.indices(self.shape[0])
        return self.narrow(0, start, max(stop - start, 0))


def materialize(loaded: torch.Tensor | CheckpointSlice) -> torch.Tensor:
    """The whole tensor (for loaders that keep all of it)."""
    if isinstance(loaded, CheckpointSlice):
        return loaded.narrow(0, 0, loaded.shape[0]) if loaded.dim() else loaded._source[...].to(loaded.dtype)
    return loaded
