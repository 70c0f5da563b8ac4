"""Maps a checkpoint's architecture name to the engine's model class."""
from __future__ import annotations

from torch import nn

from engine.errors import UnsupportedModelError


def get_model_class(architecture: str) -> type[nn.Module]:
    from engine.models.llama import LlamaForCausalLM

    registry = {
        "LlamaForCausalLM": LlamaForCausalLM,
        "MistralForCausalLM": LlamaForCausalLM,
        "Qwen2ForCausalLM": LlamaForCausalLM,
    }
    if architecture not in registry:
        raise UnsupportedModelError(f"architecture {architecture} is not supported; supported: {sorted(registry)}")
    return registry[architecture]
