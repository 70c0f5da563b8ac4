"""Reads a GGUF file's tensors with the gguf package's reader, checks them, and names them as the
Hugging Face checkpoint the engine's loaders expect (``model.layers.3.self_attn.q_proj.weight``).

Checks made here, so a bad file fails at load with the tensor's name: a file the reader cannot
parse (truncated, not GGUF), a tensor whose data is shorter than its shape needs, a row length that
is not a whole number of blocks, non-finite block scales (corrupt bytes).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.errors import ModelNotFoundError, UnsupportedModelError
from engine.layers.quantization.gguf_blocks import (
    FLOAT_TYPES, KERNEL_TYPES, block_scales, block_values, row_bytes, type_name,
)

# architectures whose tensors this loader maps (llama: also Mistral and SmolLM GGUFs)
GGUF_DIRECT_ARCHITECTURES = ("llama",)

_LAYER = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IGNORED = ("rope_freqs",)  # llama 3's precomputed rope factors: the config's rope_scaling has them


class GGUFFormatError(ModelNotFoundError):
    """A GGUF file that cannot be loaded as it is (corrupt, truncated, or of a layout not mapped)."""


@dataclass
class GGUFTensor:
    """One tensor of the file: ``data`` is a uint8 [N, row bytes] view of the blocks, or a float
    array, as the reader gives it (memory-mapped: nothing is copied until it is used)."""

    name: str  # the GGUF name
    hf_name: str | None  # the checkpoint name, None for a tensor the engine does not load
    type_id: int
    shape: tuple[int, ...]  # torch order: [N, K] for a matrix
    data: np.ndarray

    @property
    def quantized(self) -> bool:
        return self.type_id in KERNEL_TYPES

    def blocks(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data))  # a copy: the reader maps the file read-only

    def floats(self) -> torch.Tensor:
        return torch.from_numpy(np.array(self.data, dtype=np.float32)).reshape(self.shape)


def hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None if unmapped."""
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER:
        return f"model.layers.{m.group(1)}.{_LAYER[m.group(2)]}.{m.group(3)}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m.group(1) in _GLOBAL:
        return f"{_GLOBAL[m.group(1)]}.{m.group(2)}"
    return None


def read_gguf(path: Path) -> tuple[str, list[GGUFTensor]]:
    """(general.architecture, every tensor), each checked; raises GGUFFormatError naming the tensor."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError, struct errors, IndexError... on bad bytes
        raise GGUFFormatError(f"{path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else ""
    tensors = []
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape.tolist()))
        tensor = GGUFTensor(t.name, hf_name(t.name), int(t.tensor_type), shape, t.data)
        if tensor.hf_name is None and not t.name.startswith(_IGNORED):
            raise GGUFFormatError(f"{path.name}: tensor {t.name} has no place in a {arch} model")
        check_tensor(tensor, path)
        tensors.append(tensor)
    return arch, tensors


def check_tensor(t: GGUFTensor, path: Path) -> None:
    supported = sorted([*KERNEL_TYPES.values(), *FLOAT_TYPES.values()])
    if t.type_id not in KERNEL_TYPES and t.type_id not in FLOAT_TYPES:
        raise UnsupportedModelError(
            f"{path.name}: tensor {t.name} is {type_name(t.type_id)}, which quantization='gguf' does not run; "
            f"supported types: {', '.join(supported)} (quantization=None loads the file dequantized)")
    numel = int(np.prod(t.shape))
    if t.type_id in FLOAT_TYPES:
        if t.data.size != numel:
            raise GGUFFormatError(f"{path.name}: tensor {t.name} holds {t.data.size} values, its shape {t.shape} "
                                  "needs more (truncated file?)")
        return
    k = t.shape[-1]
    expected = (numel // k, row_bytes(t.type_id, k))
    if k % block_values(t.type_id) or tuple(t.data.shape) != expected:
        raise GGUFFormatError(f"{path.name}: tensor {t.name} ({KERNEL_TYPES[t.type_id]}, shape {t.shape}) has "
                              f"{t.data.nbytes} bytes of blocks where {expected[0] * expected[1]} are needed "
                              "(truncated or corrupt file?)")
    if not torch.isfinite(block_scales(t.blocks(), t.type_id)).all():
        raise GGUFFormatError(f"{path.name}: tensor {t.name} has non-finite block scales (corrupt file?)")
