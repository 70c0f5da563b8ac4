"""Which architecture a GGUF file holds, read from its header before the (slow) conversion, and
whether the engine can run it: transformers dequantizes the file into a checkpoint of the class
listed here, which the registry must know."""
from __future__ import annotations

import struct
from pathlib import Path

from engine.errors import UnsupportedModelError

# GGUF general.architecture -> the transformers class the conversion produces (all registered)
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
    "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
}
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUF value type -> bytes
_STRING, _ARRAY = 8, 9


def _read(f, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise UnsupportedModelError(f"{f.name} is not a complete GGUF file")
    return struct.unpack(fmt, data)


def _skip_value(f, kind: int) -> None:
    if kind == _STRING:
        f.seek(_read(f, "<Q")[0], 1)
    elif kind == _ARRAY:
        inner, count = _read(f, "<IQ")
        if inner in _SCALAR:
            f.seek(_SCALAR[inner] * count, 1)
        else:
            for _ in range(count):
                _skip_value(f, inner)
    else:
        f.seek(_SCALAR[kind], 1)


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` from the header's key-value section (reads a few hundred bytes)."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UnsupportedModelError(f"{path} is not a GGUF file (bad magic)")
        _version, _tensors, kv_count = _read(f, "<IQQ")
        for _ in range(kv_count):
            key = f.read(_read(f, "<Q")[0]).decode("utf-8", "replace")
            kind = _read(f, "<I")[0]
            if key == "general.architecture" and kind == _STRING:
                return f.read(_read(f, "<Q")[0]).decode()
            _skip_value(f, kind)
    raise UnsupportedModelError(f"{path} has no general.architecture in its header")


def check_gguf(path: Path) -> str:
    """The architecture the GGUF converts to; UnsupportedModelError listing the loadable ones if none."""
    arch = gguf_architecture(path)
    if arch not in GGUF_ARCHITECTURES:
        raise UnsupportedModelError(
            f"GGUF architecture {arch!r} ({path.name}) is not supported; GGUF files of these architectures "
            f"load: {', '.join(sorted(GGUF_ARCHITECTURES))}")
    return GGUF_ARCHITECTURES[arch]
