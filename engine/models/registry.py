"""The one table of supported architectures: checkpoint architecture name -> engine model class.

Classes are named by module and attribute and imported only by :func:`get_model_class`, so the
configuration code can validate an architecture without importing any model code."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engine.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

# architecture (config.json "architectures"[0]) -> (module, class name)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": ("engine.models.llama", "Qwen3ForCausalLM"),
    "Phi3ForCausalLM": ("engine.models.llama", "Phi3ForCausalLM"),
    "Gemma2ForCausalLM": ("engine.models.gemma", "Gemma2ForCausalLM"),
    "Gemma3ForCausalLM": ("engine.models.gemma", "Gemma3ForCausalLM"),
    "MixtralForCausalLM": ("engine.models.moe", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("engine.models.moe", "Qwen2MoeForCausalLM"),
    "Qwen3MoeForCausalLM": ("engine.models.moe", "Qwen3MoeForCausalLM"),
}


def supported_architectures() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_ARCHITECTURES)


def check_architecture(architecture: str | None) -> None:
    """Raises UnsupportedModelError unless ``architecture`` is registered (None: none was listed)."""
    if architecture not in _ARCHITECTURES:
        shown = architecture if architecture is not None else "(none listed in config.json)"
        raise UnsupportedModelError(f"architecture {shown} is not supported; supported: {supported_architectures()}")


def check_model_config(hf_config: Any) -> None:
    """Raises UnsupportedModelError naming the first config field that would change the maths in a
    way the architecture's class does not compute (engine/models/config_checks.py)."""
    from engine.models.config_checks import check_config

    check_config(hf_config.architectures[0], hf_config)


def get_model_class(architecture: str) -> type[nn.Module]:
    check_architecture(architecture)
    module, name = _ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module), name)
