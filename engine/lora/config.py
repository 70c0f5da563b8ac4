"""The engine's LoRA settings (vLLM's names), built from EngineArgs when ``enable_lora``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LoRAConfig:
    """``max_loras`` adapters are resident at once (preallocated slots in every LoRA layer), each of
    rank at most ``max_lora_rank``; up to ``max_cpu_loras`` more wait as host copies (an LRU)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be >= 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is None:
            self.max_cpu_loras = self.max_loras
        elif self.max_cpu_loras < self.max_loras:
            raise ValueError(f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})")
