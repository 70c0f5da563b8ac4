"""Engine-side finishing of a pooled vector: Matryoshka truncation, then normalization."""
from __future__ import annotations

import torch

from engine.pooling.config import PoolerConfig
from engine.pooling.params import PoolingParams


def finalize_embedding(pooled: torch.Tensor, params: PoolingParams, config: PoolerConfig) -> list[float]:
    """``dimensions`` first (the leading components), then L2 normalization when asked for (or,
    with ``normalize=None``, when the model's pooler config says so): the order sentence-transformers
    and vLLM use for Matryoshka models."""
    vec = pooled.float()
    if params.dimensions is not None:
        vec = vec[: params.dimensions]
    normalize = config.normalize if params.normalize is None else params.normalize
    if normalize:
        vec = torch.nn.functional.normalize(vec, p=2, dim=-1)
    return vec.tolist()
