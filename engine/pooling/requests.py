"""The engine-side pieces of a pooling request: its scheduler Request and its output."""
from __future__ import annotations

from typing import Any

from engine.outputs import EmbeddingOutput, EmbeddingRequestOutput
from engine.pooling.config import PoolerConfig
from engine.pooling.output import finalize_embedding
from engine.request import Request
from engine.sampling_params import SamplingParams


def make_pooling_request(request_id: str, inputs: Any, arrival: float, priority: int,
                         config: PoolerConfig) -> Request:
    """One scheduler request that computes the prompt and samples nothing. Its SamplingParams
    (max_tokens=1, greedy) only satisfy the code that reads every request's params."""
    return Request(
        request_id=request_id,
        prompt_token_ids=inputs.prompt_token_ids,
        sampling_params=SamplingParams(max_tokens=1, temperature=0.0, detokenize=False),
        arrival_time=arrival,
        prompt=inputs.prompt,
        priority=priority,
        parent_id=request_id,
        pooling_params=inputs.params,
        skip_reading_prefix_cache=config.pooling_type.needs_all_positions,
    )


def make_embedding_output(parent: Any, config: PoolerConfig) -> EmbeddingRequestOutput:
    """The user-facing output of a pooling parent (engine/core/output_processor.py ParentState)."""
    reason = parent.samples[0].finish_reason
    pooled = parent.pooled
    embedding = finalize_embedding(pooled, parent.pooling_params, config) if pooled is not None else []
    return EmbeddingRequestOutput(
        request_id=parent.request_id,
        outputs=EmbeddingOutput(embedding),
        prompt_token_ids=parent.prompt_token_ids,
        finished=reason is not None,
        prompt=parent.prompt,
        num_cached_tokens=parent.num_cached_tokens,
        finish_reason=reason,
    )
