"""Multi-LoRA serving: PEFT adapters applied per row of a mixed batch (docs/lora.md)."""
from engine.lora.request import LoRARequest

__all__ = ["LoRARequest"]
