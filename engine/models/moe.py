"""Mixture-of-experts families on the Llama shape: Mixtral, Qwen2-MoE (with a gated shared expert)
and Qwen3-MoE (Qwen3 attention). Each differs from its dense family only in the MLP block."""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from engine.layers.fused_moe import EXPERT_PARTS, FusedMoE
from engine.layers.linear import ReplicatedLinear
from engine.layers.norm import RMSNorm
from engine.models.llama import DecoderSpec, LlamaForCausalLM, LlamaMLP

_EXPERT = re.compile(r"\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(\w+)\.weight$")


def num_experts_of(config: Any) -> int:
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0) or 0)


class SparseMoeBlock(nn.Module):
    """Router (``gate``), the routed experts and, for Qwen2-MoE, a shared expert scaled by
    sigmoid(shared_expert_gate(x))."""

    def __init__(self, config: Any, intermediate_size: int, renormalize: bool, shared_size: int = 0) -> None:
        super().__init__()
        n = num_experts_of(config)
        self.gate = ReplicatedLinear(config.hidden_size, n, bias=False)
        self.experts = FusedMoE(config, n, config.num_experts_per_tok, intermediate_size, renormalize)
        self.shared_expert = LlamaMLP(config, shared_size, bias=False) if shared_size else None
        self.shared_expert_gate = ReplicatedLinear(config.hidden_size, 1, bias=False) if shared_size else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.experts(x, self.gate(x))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


def is_sparse_layer(config: Any, layer_idx: int) -> bool:
    """Qwen-MoE's rule: every ``decoder_sparse_step``-th layer not in ``mlp_only_layers``."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return (layer_idx not in (getattr(config, "mlp_only_layers", None) or [])
            and num_experts_of(config) > 0 and (layer_idx + 1) % step == 0)


def mixtral_mlp(config: Any, layer_idx: int) -> nn.Module:
    return SparseMoeBlock(config, config.intermediate_size, renormalize=True)


def qwen2_moe_mlp(config: Any, layer_idx: int) -> nn.Module:
    if not is_sparse_layer(config, layer_idx):
        return LlamaMLP(config)
    return SparseMoeBlock(config, config.moe_intermediate_size, bool(config.norm_topk_prob),
                          int(getattr(config, "shared_expert_intermediate_size", 0) or 0))


def qwen3_moe_mlp(config: Any, layer_idx: int) -> nn.Module:
    if not is_sparse_layer(config, layer_idx):
        return LlamaMLP(config)
    return SparseMoeBlock(config, config.moe_intermediate_size, bool(config.norm_topk_prob))


class MoEForCausalLM(LlamaForCausalLM):
    """Loads per-expert checkpoint tensors (``experts.{e}.w1`` / ``gate_proj`` ...) into the stacked
    FusedMoE parameters; everything else as the Llama family."""

    @staticmethod
    def checkpoint_target(name: str) -> tuple[str, Any] | None:
        m = _EXPERT.search(name)
        if m is not None and m.group(2) in EXPERT_PARTS:
            part = EXPERT_PARTS[m.group(2)]
            stacked = "w2_weight" if part == "down" else "w13_weight"
            return name[: m.start()] + f".mlp.experts.{stacked}", (int(m.group(1)), part)
        if ".block_sparse_moe.gate." in name:  # Mixtral's router
            return name.replace(".block_sparse_moe.gate.", ".mlp.gate."), None
        return None


class MixtralForCausalLM(MoEForCausalLM):
    spec = DecoderSpec(mlp=mixtral_mlp)


class Qwen2MoeForCausalLM(MoEForCausalLM):
    spec = DecoderSpec(mlp=qwen2_moe_mlp)


class Qwen3MoeForCausalLM(MoEForCausalLM):
    spec = DecoderSpec(qk_norm=RMSNorm, mlp=qwen3_moe_mlp)
