"""Chooses the attention backend once at start-up."""
from __future__ import annotations

import torch

from engine.attention.backends.base import AttentionBackend


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    if name in ("auto", "torch") and device.type == "cpu":
        from engine.attention.backends.torch_backend import TorchAttentionBackend

        return TorchAttentionBackend()
    raise ValueError(f"attention_backend={name!r} is not available on {device}")
