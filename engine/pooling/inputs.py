"""Checks a pooling request's input (the input processor's pooling half)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.pooling.params import PoolingParams

if TYPE_CHECKING:
    from engine.core.input_processor import InputProcessor, ProcessedInput


def process_pooling(processor: InputProcessor, prompt: Any, params: PoolingParams | None) -> ProcessedInput:
    """Tokenizes and checks one pooling request; raises InvalidInputError naming the field, or
    PromptTooLongError (the same errors, and so the same 400s, as for completions)."""
    from engine.core.input_processor import InvalidInputError, ProcessedInput

    params = params.clone() if params is not None else PoolingParams()
    try:
        params.validate()
    except ValueError as e:
        raise InvalidInputError(str(e), str(e).split(" ", 1)[0]) from None
    config = processor.pooler_config
    if params.dimensions is not None:
        if config is None or not config.allows_dimensions:
            raise InvalidInputError(
                "dimensions is only supported by models trained for truncated (Matryoshka) embeddings; "
                "this model is not (its config.json sets neither is_matryoshka nor matryoshka_dimensions): "
                "omit dimensions", "dimensions",
            )
        allowed = config.matryoshka_dimensions
        if allowed and params.dimensions not in allowed:
            raise InvalidInputError(f"dimensions must be one of {list(allowed)}, got {params.dimensions}", "dimensions")
    text, ids = processor.tokenize_prompt(prompt)
    if processor.check_prompt is not None:
        processor.check_prompt(len(ids))
    return ProcessedInput(text, ids, params)
