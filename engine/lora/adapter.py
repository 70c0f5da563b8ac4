"""Reading and checking PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

Checks run against the base model's config before any weight is read, so a bad adapter is a typed
error naming the fix (the server answers 400) and never reaches a worker mid-step.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.core.input_processor import InvalidInputError

# the projections an adapter may target: PEFT module name -> (the engine's layer, slice in it)
TARGET_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2), "o_proj": ("o_proj", 0),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1), "down_proj": ("down_proj", 0),
}
_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.default)?\.weight$")


class LoRAError(InvalidInputError):
    """An adapter the engine cannot serve; the message names the field and the fix."""

    def __init__(self, message: str, param: str = "lora_request") -> None:
        super().__init__(message, param)


class LoRANotFoundError(LoRAError):
    """The adapter's path holds no PEFT adapter."""


def module_shapes(hf_config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every target projection of the base model."""
    hidden = hf_config.hidden_size
    heads = hf_config.num_attention_heads
    kv = getattr(hf_config, "num_key_value_heads", None) or heads
    hd = getattr(hf_config, "head_dim", None) or hidden // heads
    inter = hf_config.intermediate_size
    return {"q_proj": (hidden, heads * hd), "k_proj": (hidden, kv * hd), "v_proj": (hidden, kv * hd),
            "o_proj": (heads * hd, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
            "down_proj": (inter, hidden)}


@dataclass
class LoRAWeights:
    """One projection's adapter: delta = scale * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoRAAdapter:
    """A checked adapter; ``weights`` is empty until loaded (the engine process only checks)."""

    lora_int_id: int
    path: Path
    rank: int
    lora_alpha: float
    use_rslora: bool
    target_modules: list[str]
    shapes: dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]]  # (layer, module) -> (A, B) shapes
    weights: dict[tuple[int, str], LoRAWeights] = field(default_factory=dict, repr=False)

    def scale_for(self, r: int) -> float:
        return self.lora_alpha / (math.sqrt(r) if self.use_rslora else r)


def _files(path: str | Path) -> tuple[Path, Path]:
    root = Path(path)
    cfg = root / "adapter_config.json"
    if not root.is_dir() or not cfg.is_file():
        raise LoRANotFoundError(f"no LoRA adapter at lora_path {str(path)!r}: expected a directory holding "
                                "adapter_config.json and adapter_model.safetensors (PEFT's save_pretrained)")
    st = root / "adapter_model.safetensors"
    if not st.is_file():
        hint = ""
        if (root / "adapter_model.bin").is_file():
            hint = " (adapter_model.bin is not read: save with safe_serialization=True)"
        raise LoRANotFoundError(f"lora_path {str(path)!r} has no adapter_model.safetensors{hint}")
    return cfg, st


def _read_config(cfg_file: Path, max_rank: int) -> dict:
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LoRAError(f"{cfg_file} is not valid JSON: {e}") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"{cfg_file}: peft_type {cfg.get('peft_type')!r} is not supported; only LORA adapters are")
    for key, bad, why in (("use_dora", True, "DoRA"), ("fan_in_fan_out", True, "fan_in_fan_out (Conv1D) layers")):
        if cfg.get(key) == bad:
            raise LoRAError(f"{cfg_file}: {why} is not supported; train a plain LoRA adapter")
    if cfg.get("bias", "none") != "none":
        raise LoRAError(f"{cfg_file}: bias={cfg['bias']!r} is not supported; use bias='none'")
    if cfg.get("modules_to_save"):
        raise LoRAError(f"{cfg_file}: modules_to_save {cfg['modules_to_save']} is not supported; "
                        "only LoRA matrices on the projections are applied")
    if cfg.get("alpha_pattern"):
        raise LoRAError(f"{cfg_file}: alpha_pattern is not supported; use one lora_alpha")
    r = int(cfg.get("r", 8))
    if r > max_rank:
        raise LoRAError(f"the adapter's rank r={r} exceeds max_lora_rank={max_rank}; "
                        f"raise --max-lora-rank to at least {r}")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, list):
        unknown = [t for t in targets if t not in TARGET_MODULES]
        if unknown:
            raise LoRAError(f"target module(s) {unknown} of the adapter are not LoRA targets of this model; "
                            f"supported: {sorted(TARGET_MODULES)}")
    return cfg


def inspect_adapter(lora_int_id: int, path: str | Path, hf_config: Any, max_rank: int) -> LoRAAdapter:
    """Checks the adapter against the base model (its config and the tensors' names and shapes,
    read from the safetensors header) without loading weights."""
    from safetensors import safe_open

    cfg_file, st_file = _files(path)
    cfg = _read_config(cfg_file, max_rank)
    shapes = module_shapes(hf_config)
    num_layers = hf_config.num_hidden_layers
    found: dict[tuple[int, str], dict[str, tuple[int, ...]]] = {}
    try:
        with safe_open(str(st_file), framework="pt") as f:
            for key in f.keys():
                m = _KEY.search(key)
                if m is None:
                    raise LoRAError(f"{st_file}: tensor {key!r} is not a LoRA matrix of a supported projection "
                                    f"({sorted(TARGET_MODULES)}); only lora_A / lora_B weights are applied")
                layer, module, ab = int(m.group(1)), m.group(2), m.group(3)
                if module not in TARGET_MODULES:
                    raise LoRAError(f"the adapter targets {module!r}, which this model has no LoRA layer for; "
                                    f"supported: {sorted(TARGET_MODULES)}")
                if layer >= num_layers:
                    raise LoRAError(f"the adapter has weights for layer {layer}, but the base model has "
                                    f"{num_layers} layers: it was trained on another base model")
                found.setdefault((layer, module), {})[ab] = tuple(f.get_slice(key).get_shape())
    except LoRAError:
        raise
    except Exception as e:  # noqa: BLE001 - a corrupt file: say which
        raise LoRAError(f"{st_file} cannot be read as safetensors: {e}") from None
    if not found:
        raise LoRAError(f"{st_file} holds no LoRA weights")
    out: dict[tuple[int, str], tuple[tuple[int, ...], tuple[int, ...]]] = {}
    max_r = 0
    for (layer, module), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise LoRAError(f"layer {layer} {module}: the adapter has lora_{''.join(ab)} without its pair")
        a, b = ab["A"], ab["B"]
        in_f, out_f = shapes[module]
        if len(a) != 2 or len(b) != 2 or a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise LoRAError(f"layer {layer} {module}: lora_A {list(a)} / lora_B {list(b)} do not fit the base "
                            f"model's [{out_f}, {in_f}] projection (expected [r, {in_f}] and [{out_f}, r]); "
                            "the adapter was trained on another base model")
        if a[0] > max_rank:
            raise LoRAError(f"layer {layer} {module} has rank {a[0]}, above max_lora_rank={max_rank}; "
                            f"raise --max-lora-rank to at least {a[0]}")
        max_r = max(max_r, a[0])
        out[(layer, module)] = (a, b)
    return LoRAAdapter(lora_int_id, Path(path), max_r,
                       float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora", False)),
                       sorted({m for _, m in out}), out)


def load_adapter(lora_int_id: int, path: str | Path, hf_config: Any, max_rank: int) -> LoRAAdapter:
    """The checked adapter with its weights (fp32, on the host); ``b`` already carries the scale."""
    from safetensors.torch import load_file

    adapter = inspect_adapter(lora_int_id, path, hf_config, max_rank)
    tensors = load_file(str(_files(path)[1]))
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.search(key)
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    for lm, ab in pairs.items():
        a = ab["A"].to(torch.float32)
        scale = adapter.scale_for(a.shape[0])
        adapter.weights[lm] = LoRAWeights(a, ab["B"].to(torch.float32) * scale, scale)
    return adapter
