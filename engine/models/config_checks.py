"""Refuses, before any weight is read, configurations whose maths an architecture's class would
get wrong: every field named here changes what a model computes, and a field the engine does not
implement raises UnsupportedModelError naming it (never a silently different model)."""
from __future__ import annotations

from typing import Any

from engine.errors import UnsupportedModelError
from engine.layers.activation import check_activation
from engine.layers.rope_scaling import check_rope_scaling

_GEMMA = {"Gemma2ForCausalLM", "Gemma3ForCausalLM"}
_ATTN_SOFTCAP = {"Gemma2ForCausalLM"}  # the families whose attention applies attn_logit_softcapping
_LAYER_TYPES = {"full_attention", "sliding_attention"}


def _rope_dicts(config: Any) -> list[dict | None]:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" not in params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())  # per layer type (Gemma 3)
    if isinstance(params, dict):
        return [params]
    return [getattr(config, "rope_scaling", None)]


def check_config(architecture: str, config: Any) -> None:
    check_activation(config)
    for rope in _rope_dicts(config):
        check_rope_scaling(rope)
    if getattr(config, "attn_logit_softcapping", None) and architecture not in _ATTN_SOFTCAP:
        raise UnsupportedModelError(
            f"attn_logit_softcapping={config.attn_logit_softcapping} is not supported for {architecture} "
            f"(only {', '.join(sorted(_ATTN_SOFTCAP))} applies it)")
    if getattr(config, "final_logit_softcapping", None) and architecture not in _GEMMA:
        raise UnsupportedModelError(f"final_logit_softcapping is not supported for {architecture}")
    if getattr(config, "use_bidirectional_attention", None):
        raise UnsupportedModelError("use_bidirectional_attention=True (non-causal attention) is not supported")
    types = getattr(config, "layer_types", None)
    if types is not None:
        unknown = sorted(set(types) - _LAYER_TYPES)
        if unknown:
            raise UnsupportedModelError(f"layer_types {unknown} are not supported (supported: {sorted(_LAYER_TYPES)})")
    if architecture in _GEMMA and getattr(config, "query_pre_attn_scalar", None) is None:
        raise UnsupportedModelError(f"{architecture} needs query_pre_attn_scalar in its config")
    if getattr(config, "mlp_bias", False) and architecture not in {"LlamaForCausalLM"}:
        raise UnsupportedModelError(f"mlp_bias is not supported for {architecture}")
