"""Builds a model and loads its (sharded) weights from safetensors files."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.errors import ModelNotFoundError
from engine.models.registry import get_model_class

logger = logging.getLogger(__name__)


def build_model(hf_config: Any, dtype: torch.dtype, device: torch.device) -> nn.Module:
    cls = get_model_class(hf_config.architectures[0])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(hf_config)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def _param_target(model: nn.Module, name: str) -> tuple[str, Any]:
    """Maps a checkpoint tensor name to (our parameter name, shard id)."""
    for ckpt, (ours, shard) in getattr(model, "packed_modules", {}).items():
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None


def load_weights(model: nn.Module, path: Path, show_progress: bool = True) -> None:
    """Copies each checkpoint tensor (this rank's slice of it) into the model's parameters."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors weights in {path}; the engine loads safetensors checkpoints")
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tied = getattr(model, "tie_word_embeddings", False)
    handles = [safe_open(str(f), framework="pt") for f in files]
    total = sum(len(list(h.keys())) for h in handles)
    bar = tqdm(total=total, desc="Loading weights", unit="tensor", disable=not show_progress)
    for handle in handles:
        for name in handle.keys():
            bar.update(1)
            if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                continue
            target, shard = _param_target(model, name)
            param = params.get(target)
            if param is None:
                logger.warning("checkpoint tensor %s has no matching parameter; ignored", name)
                continue
            tensor = handle.get_tensor(name).to(param.dtype)
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(tensor)
            elif shard is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard)
            loaded.add(target)
    bar.close()
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        raise ModelNotFoundError(f"the checkpoint in {path} lacks weights for: {', '.join(missing[:8])}")


def load_model(hf_config: Any, path: Path, dtype: torch.dtype, device: torch.device, show_progress: bool = True) -> nn.Module:
    model = build_model(hf_config, dtype, device)
    load_weights(model, path, show_progress)
    return model
