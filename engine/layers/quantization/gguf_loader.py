"""Loads a GGUF file's tensors into a built model, keeping quantized weights (every type of
engine/layers/quantization/gguf_blocks.py) as blocks.

Each matmul weight (linear layers, the embedding and LM head) becomes a uint8 ``[rows, row bytes]``
tensor of this rank's GGUF blocks, with ``gguf_type`` and ``gguf_k`` on its module and a
:class:`GGUFLinearMethod`. Norms and other float tensors load as fp32, as from a checkpoint.

Which rows and columns of a checkpoint tensor a layer keeps (fused QKV and gate/up, tensor-parallel
shards, padded heads) is decided by the layer's own ``weight_loader``, unchanged: it is run once on
an *index* tensor (each element holding its own position in the source tensors), and the blocks are
then gathered at the positions it kept. A kept range that does not cover whole blocks (32 values,
256 for a k-quant: a tensor-parallel split inside a block) fails with the layer's name. A fused
layer whose parts have different types (a Q4_K_M file's q/k in Q4_K and v in Q6_K) keeps each part
in its own type, one kernel per part writing its columns (:class:`GGUFPartsLinearMethod`); only a
layer whose parts do not fall on whole row ranges, or a tensor in a float type, is dequantized.

Llama GGUFs store q_proj and k_proj rows in the interleaved rotary order llama.cpp uses; their rows
are put back in the Hugging Face order transformers' conversion produces (a row permutation).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.layers.quantization.gguf_blocks import KERNEL_TYPES, block_values, dequantize
from engine.layers.quantization.gguf_reader import GGUF_DIRECT_ARCHITECTURES, GGUFFormatError, GGUFTensor, read_gguf

logger = logging.getLogger(__name__)


def rotary_row_order(rows: int, n_head: int) -> torch.Tensor:
    """Row i of the Hugging Face q/k weight is row ``order[i]`` of the GGUF one (transformers'
    reverse permutation: per head, [pairs, 2] -> [2, pairs])."""
    return torch.arange(rows).view(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(-1)


def _row_order(t: GGUFTensor, hf_config: Any) -> torch.Tensor | None:
    if t.hf_name is None or len(t.shape) != 2:
        return None
    if t.hf_name.endswith("self_attn.q_proj.weight"):
        return rotary_row_order(t.shape[0], hf_config.num_attention_heads)
    if t.hf_name.endswith("self_attn.k_proj.weight"):
        heads = getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads
        return rotary_row_order(t.shape[0], heads)
    return None


def _as_float(t: GGUFTensor, order: torch.Tensor | None) -> torch.Tensor:
    w = dequantize(t.blocks(), t.type_id, t.shape[-1]) if t.quantized else t.floats()
    return w if order is None else w[order]


def _call_loader(param: nn.Parameter, tensor: torch.Tensor, shard) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is None:
        param.data.copy_(tensor.to(param.dtype))
    elif shard is None:
        loader(param, tensor)
    else:
        loader(param, tensor, shard)


def _gather_blocks(module: nn.Module, name: str, param: nn.Parameter,
                   sources: list[tuple[GGUFTensor, Any, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's blocks of ``param`` [N_l, K_l] from its sources (all of one type), and which of
    its rows they filled: the layer's loader runs on an index tensor (value = 1 + the element's
    position in the concatenated sources, 0 = left empty)."""
    from engine.layers.embedding import VocabParallelEmbedding

    k = sources[0][0].shape[-1]
    vb = block_values(sources[0][0].type_id)  # values per block: 32, or 256 for a k-quant
    rows_only = isinstance(module, VocabParallelEmbedding)  # its loader slices rows only
    width = 1 if rows_only else k
    index = nn.Parameter(torch.zeros(param.shape[0], 1 if rows_only else param.shape[1], dtype=torch.float64),
                         requires_grad=False)
    index.weight_loader = getattr(param, "weight_loader", None)  # the layer's own (a bound method)
    base, parts = 0, []
    for t, shard, order in sources:
        n = t.shape[0]
        positions = (base + torch.arange(n, dtype=torch.float64)).unsqueeze(1) * width
        positions = positions + torch.arange(width, dtype=torch.float64) + 1
        _call_loader(index, positions, shard)
        blocks = t.blocks().view(n, k // vb, -1)
        parts.append(blocks if order is None else blocks[order])
        base += n
    source = torch.cat(parts) if len(parts) > 1 else parts[0]
    idx = index.data
    if rows_only:
        if param.shape[1] != k:
            raise GGUFFormatError(f"{name}: {param.shape[1]} columns here, {k} in the file")
        rows = idx[:, 0].long() - 1
        out = source[rows.clamp_min(0)].reshape(param.shape[0], -1).clone()
        out[rows < 0] = 0  # padding rows of a sharded vocabulary: zero blocks (d = 0, m = 0)
        return out, rows >= 0
    n_l, k_l = idx.shape
    if k_l % vb:
        raise GGUFFormatError(f"{name}: a shard of {k_l} input values is not a whole number of {vb}-value "
                              "GGUF blocks; use a tensor-parallel size that splits it along whole blocks")
    starts = idx[:, ::vb]
    expected = torch.where(starts.unsqueeze(-1) > 0, starts.unsqueeze(-1) + torch.arange(vb), 0.0)
    flat = (starts.long() - 1).clamp_min(0)
    if not torch.equal(idx.view(n_l, -1, vb), expected) or bool(((flat % k) % vb).any()):
        raise GGUFFormatError(f"{name}: this rank's part of the weight does not fall on whole {vb}-value "
                              "GGUF blocks; use a tensor-parallel size that splits it along whole blocks")
    out = source[flat // k, (flat % k) // vb]  # [N_l, K_l / vb, block bytes]
    out[starts <= 0] = 0
    return out.reshape(n_l, -1).contiguous(), (starts > 0).any(dim=1)


def _replace_weight(model: nn.Module, old: nn.Parameter, blocks: torch.Tensor, k: int, type_id: int | None = None,
                    parts: list | None = None) -> None:
    """Puts the blocks in place of ``old`` on every module that holds it (a tied LM head too): one
    type's ``[rows, row bytes]``, or (``parts``) the parts' bytes end to end with views per part."""
    from engine.layers.quantization.gguf import GGUFLinearMethod, GGUFPartsLinearMethod

    new = nn.Parameter(blocks, requires_grad=False)
    for module in model.modules():
        if module._parameters.get("weight") is old:
            module.weight = new
            module.gguf_type, module.gguf_k = type_id, k
            if parts is not None:
                module.gguf_parts = parts
            if hasattr(module, "linear_method"):
                module.linear_method = GGUFLinearMethod() if parts is None else GGUFPartsLinearMethod()


def _gather_parts(module: nn.Module, name: str, param: nn.Parameter,
                  sources: list[tuple[GGUFTensor, Any, torch.Tensor | None]], device: torch.device | None):
    """A fused layer of several block types as (bytes, parts), each source a whole range of this
    rank's output rows in its own type; None when the sources do not tile the rows that way."""
    from engine.layers.quantization.gguf import GGUFPart

    ranges = []
    for source in sources:
        blocks, filled = _gather_blocks(module, name, param, [source])
        rows = filled.nonzero().flatten()
        if len(rows) == 0:
            continue  # nothing of this source on this rank
        start, stop = int(rows[0]), int(rows[-1]) + 1
        if stop - start != len(rows):
            return None
        ranges.append((start, stop, source[0].type_id, blocks[start:stop]))
    ranges.sort(key=lambda r: r[0])
    if [r[0] for r in ranges] != [0] + [r[1] for r in ranges[:-1]] or ranges[-1][1] != param.shape[0]:
        return None
    flat = torch.cat([r[3].reshape(-1) for r in ranges])
    flat = flat.to(device) if device is not None else flat
    parts, at = [], 0
    for start, stop, type_id, blocks in ranges:
        parts.append(GGUFPart(start, stop, type_id, flat[at:at + blocks.numel()].view(blocks.shape)))
        at += blocks.numel()
    return flat, parts


def load_gguf_weights(model: nn.Module, path: Path, hf_config: Any, device: torch.device | None = None) -> int:
    """Loads every tensor of the GGUF at ``path`` into ``model``; returns how many weights stay
    quantized. Raises GGUFFormatError / UnsupportedModelError naming the tensor at fault."""
    from engine.layers.embedding import VocabParallelEmbedding
    from engine.layers.linear import LinearBase
    from engine.models.loader import _param_target

    arch, tensors = read_gguf(Path(path))
    if arch not in GGUF_DIRECT_ARCHITECTURES:
        raise GGUFFormatError(f"{Path(path).name}: quantization='gguf' maps {', '.join(GGUF_DIRECT_ARCHITECTURES)} "
                              f"GGUF files, not {arch!r}; quantization=None loads it dequantized")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    tied = getattr(model, "tie_word_embeddings", False)
    groups: dict[str, list[tuple[GGUFTensor, Any, torch.Tensor | None]]] = {}
    for t in tensors:
        if t.hf_name is None or (tied and t.hf_name == "lm_head.weight"):
            continue
        target, shard = _param_target(model, t.hf_name)
        if target not in params:
            raise GGUFFormatError(f"{Path(path).name}: tensor {t.name} ({t.hf_name}) has no parameter in the model")
        groups.setdefault(target, []).append((t, shard, _row_order(t, hf_config)))
    missing = [n for n in params if n not in groups]
    if missing:
        raise GGUFFormatError(f"{Path(path).name} lacks tensors for: {', '.join(missing[:8])}")
    kept = 0
    for target, sources in groups.items():
        param = params[target]
        module = modules[target.rsplit(".", 1)[0]]
        types = {t.type_id for t, _, _ in sources}
        quantizable = (target.endswith(".weight") and param.dim() == 2
                       and isinstance(module, (LinearBase, VocabParallelEmbedding)))
        if quantizable and len(types) == 1 and next(iter(types)) in KERNEL_TYPES:
            type_id = next(iter(types))
            blocks, _ = _gather_blocks(module, target, param, sources)
            _replace_weight(model, param, blocks.to(device) if device is not None else blocks, param.shape[1], type_id)
            kept += 1
            continue
        if quantizable and types <= set(KERNEL_TYPES) and isinstance(module, LinearBase):
            gathered = _gather_parts(module, target, param, sources, device)
            if gathered is not None:
                _replace_weight(model, param, gathered[0], param.shape[1], parts=gathered[1])
                kept += 1
                continue
        if quantizable and types & set(KERNEL_TYPES):
            logger.info("GGUF: %s mixes block types %s in rows it cannot keep apart; dequantized at load",
                        target, sorted(types))
        for t, shard, order in sources:
            _call_loader(param, _as_float(t, order), shard)
    return kept
