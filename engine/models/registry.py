"""The one table of supported architectures: checkpoint architecture name -> engine model class.

Classes are named by module and attribute and imported only by :func:`get_model_class`, so the
configuration code can validate an architecture without importing any model code."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from engine.errors import UnsupportedModelError

if TYPE_CHECKING:
    from torch import nn

# architecture (config.json "architectures"[0]) -> (module, class name)
_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
    "Qwen2ForCausalLM": ("engine.models.llama", "LlamaForCausalLM"),
}


def supported_architectures() -> list[str]:
    """The registered architecture names, sorted."""
    return sorted(_ARCHITECTURES)


def check_architecture(architecture: str | None) -> None:
    """Raises UnsupportedModelError unless ``architecture`` is registered (None: none was listed)."""
    if architecture not in _ARCHITECTURES:
        shown = architecture if architecture is not None else "(none listed in config.json)"
        raise UnsupportedModelError(f"architecture {shown} is not supported; supported: {supported_architectures()}")


def get_model_class(architecture: str) -> type[nn.Module]:
    check_architecture(architecture)
    module, name = _ARCHITECTURES[architecture]
    return getattr(importlib.import_module(module), name)
