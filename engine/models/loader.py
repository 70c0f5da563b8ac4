"""Builds a model and loads its (sharded) weights from safetensors files."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from engine.errors import ModelNotFoundError, UnsupportedModelError
from engine.layers.checkpoint import CheckpointSlice
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
    hook = getattr(model, "checkpoint_target", None)  # a family's own names (MoE experts)
    target = hook(name) if hook is not None else None
    if target is not None:
        return target
    for ckpt, (ours, shard) in getattr(model, "packed_modules", {}).items():
        if f".{ckpt}." in name:
            return name.replace(f".{ckpt}.", f".{ours}."), shard
    return name, None


def load_weights(model: nn.Module, path: Path, show_progress: bool = True,
                 owns: Callable[[str], bool] | None = None) -> None:
    """Copies each checkpoint tensor (this rank's slice of it) into the model's parameters.
    ``owns`` (a pipeline stage's): tensors of parameters it does not own are skipped unread."""
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
            if param is None and owns is not None and not owns(target):
                continue  # another pipeline stage's
            if param is None:
                logger.warning("checkpoint tensor %s has no matching parameter; ignored", name)
                continue
            loader = getattr(param, "weight_loader", None)
            if loader is None:
                param.data.copy_(handle.get_tensor(name).to(param.dtype))
            else:  # the loader reads only the slice this rank keeps
                tensor = CheckpointSlice(handle.get_slice(name), param.dtype)
                loader(param, tensor) if shard is None else loader(param, tensor, shard)
            loaded.add(target)
    bar.close()
    missing = [n for n in params if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        raise ModelNotFoundError(f"the checkpoint in {path} lacks weights for: {', '.join(missing[:8])}")


def use_column_major_weights(model: nn.Module) -> int:
    """Stores every matmul weight ``[out, in]`` column-major (same shape, transposed strides).

    ``F.linear(x, w)`` multiplies by ``w.T``; with column-major storage ``w.T`` is a contiguous
    ``[in, out]`` matrix, the layout CPU GEMM kernels stream fastest at small batch: a decode step
    at batch 1 runs its weights at the machine's read bandwidth instead of about 75% of it, and the
    LM head alone drops from ~6 to ~2.5 ms (docs/performance.md). A tied embedding shares the LM
    head's storage; its row lookups get slower, which costs under 1% of a 2,048-token prefill.
    Returns the number of tensors converted."""
    from engine.layers.embedding import ParallelLMHead
    from engine.layers.linear import LinearBase

    done: set[int] = set()
    for module in model.modules():
        if not isinstance(module, (LinearBase, ParallelLMHead)):
            continue
        w = module.weight
        if w.dim() != 2 or id(w) in done or not w.is_floating_point():
            continue
        done.add(id(w))
        w.data = w.data.t().contiguous().t()
    return len(done)


def cpu_kernels_take_weights(dtype: torch.dtype) -> bool:
    """True when the fp32 C kernels will run this model's small-batch matmuls: they read weights
    row-major, the layout the checkpoint has, so the column-major copy is skipped (torch's GEMM is
    as fast either way from a few dozen rows on, docs/performance.md)."""
    from engine.kernels.cpu.ops import load

    return dtype == torch.float32 and load() is not None


def quantize_model(model: nn.Module, quantization: str | None) -> int:
    """Gives each matmul layer the method ``quantization`` assigns it and converts its loaded
    weights (the full-precision copies are freed). A tied input embedding is re-pointed at the
    converted LM head weight. Returns the number of layers converted."""
    from engine.layers.embedding import VocabParallelEmbedding
    from engine.layers.quantization import method_for

    count = 0
    for name, module in list(model.named_modules()):
        method = method_for(quantization, name, module)
        if method is None:
            continue
        old = module.weight
        module.linear_method = method
        method.process_weights_after_loading(module)
        count += 1
        for other in model.modules():  # tied embeddings share the LM head's weight
            if other is not module and isinstance(other, VocabParallelEmbedding) and other.weight is old:
                other.weight, other.weight_scale = module.weight, module.weight_scale
    return count


def load_model(hf_config: Any, path: Path, dtype: torch.dtype, device: torch.device, show_progress: bool = True,
               quantization: str | None = None, gguf_file: Path | None = None, layer_range: Any = None) -> nn.Module:
    """``layer_range`` (engine.pipeline.partition.LayerRange): build only a pipeline stage's part."""
    model = build_model(hf_config, dtype, device)
    owns = None
    if layer_range is not None:
        from engine.pipeline.partition import partition_model

        if quantization == "gguf":
            raise UnsupportedModelError("pipeline parallelism loads safetensors checkpoints, not GGUF blocks; "
                                        "convert the model, or use tensor parallelism")
        partition_model(model, layer_range)
        tied = bool(getattr(model, "tie_word_embeddings", False))
        owns = lambda name: layer_range.owns(name, tied)  # noqa: E731
    if quantization == "gguf":  # weights read from the GGUF file, matmul weights kept as its blocks
        from engine.layers.quantization.gguf_loader import load_gguf_weights

        if gguf_file is None:
            raise ValueError("quantization='gguf' needs the .gguf file (ModelConfig.gguf_file)")
        load_gguf_weights(model, gguf_file, hf_config, device)
        return model
    load_weights(model, path, show_progress, owns)
    if quantization is not None:
        quantize_model(model, quantization)
    if device.type == "cpu" and not cpu_kernels_take_weights(dtype):
        use_column_major_weights(model)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters ``model`` holds on this rank (shared/tied tensors counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total
