"""Pooling (embeddings): prompts run through the same scheduler as generation, prefill only, and
the worker returns one pooled hidden state per finished request instead of a sampled token."""
from engine.pooling.config import PoolerConfig, PoolingType, resolve_pooler_config
from engine.pooling.params import PoolingParams

__all__ = ["PoolerConfig", "PoolingParams", "PoolingType", "resolve_pooler_config"]
