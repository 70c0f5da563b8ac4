"""Per-request pooling controls (vLLM's ``PoolingParams``)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PoolingParams:
    """``dimensions``: keep the first N dimensions (Matryoshka models only), then normalize;
    ``normalize``: None takes the model's pooler config (sentence-transformers' Normalize module,
    or the default for its pooling type)."""

    dimensions: int | None = None
    normalize: bool | None = None
    task: str = "embed"

    def validate(self) -> None:
        """Raises ValueError naming the field (the input processor turns it into InvalidInputError)."""
        d = self.dimensions
        if d is not None and (not isinstance(d, int) or isinstance(d, bool) or d < 1):
            raise ValueError(f"dimensions must be a positive integer, got {d!r}")
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"normalize must be true, false or null, got {self.normalize!r}")
        if self.task != "embed":
            raise ValueError(f"task {self.task!r} is not supported; the only pooling task is 'embed'")

    def clone(self) -> "PoolingParams":
        return PoolingParams(self.dimensions, self.normalize, self.task)
