"""A GGUF file of a tiny Hugging Face model, written with the gguf package's writer, the way
llama.cpp's converter lays one out: tensors under GGUF names (transformers' own name map, read
backwards), the architecture's hyperparameters under its GGUF keys, and the default model's
tokenizer copied from its GGUF. For loading tests of architectures no GGUF file exists offline for."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch

# transformers model_type -> GGUF architecture
GGUF_ARCH = {"qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2", "phi3": "phi3", "llama": "llama"}


@lru_cache(maxsize=2)
def _tokenizer_fields(path: str) -> tuple[tuple[str, object, object], ...]:
    """(key, value, GGUFValueType) of every tokenizer.* field of a GGUF file (read once per file:
    parsing 49,152 tokens and their merges takes seconds)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8", "surrogateescape") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            out.append((key, value, sub))
        elif kind == gguf.GGUFValueType.STRING:
            out.append((key, bytes(field.parts[field.data[0]]).decode(), kind))
        else:
            out.append((key, field.parts[field.data[0]].tolist()[0], kind))
    return tuple(out)


def write_gguf(hf_dir: Path, out_path: Path, tokenizer_gguf: Path, quantize_q8: bool = False,
               types: Callable[[str], int | None] | None = None) -> Path:
    """``hf_dir`` (a model whose vocabulary is the default model's) as a GGUF file; 2-D weights
    stored as Q8_0 when ``quantize_q8`` (the gguf package's quantizer), or in the GGML type
    ``types(gguf name)`` gives (engine/layers/quantization/gguf_blocks.quantize_reference; None:
    F32); everything else F32. Llama q/k rows are stored in llama.cpp's rotary interleave."""
    import gguf
    from transformers import AutoModelForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    config = model.config
    arch = GGUF_ARCH[config.model_type]
    writer = gguf.GGUFWriter(str(out_path), arch)
    writer.add_name(f"tiny-{arch}")
    for key, attr in GGUF_CONFIG_MAPPING[arch].items():
        value = getattr(config, attr, None) if attr else None
        if value is None:
            continue
        full = f"{arch}.{key}"
        if isinstance(value, float):
            writer.add_float32(full, value)
        elif isinstance(value, int):
            writer.add_uint32(full, value)
    rope = getattr(config, "rope_parameters", None) or {}
    if "rope_theta" in rope and not hasattr(config, "rope_theta"):
        writer.add_float32(f"{arch}.rope.freq_base", float(rope["rope_theta"]))
    for key, value, kind in _tokenizer_fields(str(tokenizer_gguf)):
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, kind)
    hf_to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        data = tensor.detach().float().numpy()
        if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
            data = data + 1  # llama.cpp stores Gemma's 1 + w; transformers' reader subtracts the 1
        name = hf_to_gguf[hf_name]
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = np.ascontiguousarray(
                data.reshape(heads, 2, data.shape[0] // heads // 2, data.shape[1]).swapaxes(1, 2).reshape(data.shape))
        type_id = types(name) if types is not None and data.ndim == 2 else None
        if type_id is not None:
            from engine.layers.quantization.gguf_blocks import quantize_reference

            q = quantize_reference(torch.from_numpy(data), type_id).numpy()
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType(type_id))
        elif quantize_q8 and data.ndim == 2 and data.shape[1] % 32 == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path


def q8_round_trip(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with the weights ``write_gguf(quantize_q8=True)`` stores as Q8_0 replaced by their
    dequantized Q8_0 values (the gguf package's own quantize and dequantize): the reference for a
    Q8_0 file."""
    import gguf

    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and p.shape[1] % 32 == 0:
                data = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(data, q8), q8)).reshape(p.shape))
    return model


def round_trip(model: torch.nn.Module, types: Callable[[str], int | None]) -> torch.nn.Module:
    """``model`` with each 2-D weight that ``write_gguf(types=types)`` stores quantized replaced by
    its values after the round trip (quantize_reference, then the gguf package's dequantize): the
    reference for such a file. Quantization is per row, so llama's row interleave commutes with it."""
    import gguf
    from transformers.modeling_gguf_pytorch_utils import TensorProcessor, get_gguf_hf_weights_map

    from engine.layers.quantization.gguf_blocks import quantize_reference

    hf_to_gguf = {hf: g for g, hf in get_gguf_hf_weights_map(model, TensorProcessor()).items()}
    with torch.no_grad():
        for hf_name, p in model.named_parameters():
            type_id = types(hf_to_gguf[hf_name]) if p.dim() == 2 and hf_name in hf_to_gguf else None
            if type_id is None:
                continue
            blocks = quantize_reference(p.detach().float(), type_id).numpy()
            p.copy_(torch.from_numpy(gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType(type_id))).reshape(p.shape))
    return model
