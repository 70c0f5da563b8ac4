"""Gemma 2 and Gemma 3 (text): declarative, on the Llama family's attention and MLP.

What differs from Llama, each a layer choice: GeGLU (``hidden_activation``), RMSNorm scaling by
``1 + weight`` (GemmaRMSNorm), norms before and after both the attention and the MLP, token
embeddings scaled by sqrt(hidden), the softmax scale ``query_pre_attn_scalar^-0.5``, sliding-window
layers per ``layer_types``, Gemma 2's attention and final logit soft-capping, and Gemma 3's per-head
q/k norms with a separate rope base (``rope_parameters["sliding_attention"]``) for local layers."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.layers.embedding import VocabParallelEmbedding
from engine.layers.norm import GemmaRMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, make_rotary


class GemmaEmbedding(VocabParallelEmbedding):
    """Token embeddings times sqrt(hidden) (rounded to the model dtype, as transformers does); the
    LM head tied to it reads the unscaled weight."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__(vocab_size, hidden)
        self.scale = float(torch.tensor(hidden**0.5, dtype=self.weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.scale


class GemmaDecoderLayer(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int, qk_norm: bool) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = LlamaAttention(
            config, rotary_emb, layer_idx, bias=bool(getattr(config, "attention_bias", False)),
            qk_norm=GemmaRMSNorm if qk_norm else None, scale=float(config.query_pre_attn_scalar) ** -0.5,
            softcap=getattr(config, "attn_logit_softcapping", None) or 0.0,
        )
        self.mlp = LlamaMLP(config, bias=False)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)  # residual += attention
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class GemmaModel(nn.Module):
    def __init__(self, config: Any, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = GemmaEmbedding(config.vocab_size, config.hidden_size)
        types = list(getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers)
        per_type = isinstance(getattr(config, "rope_parameters", None), dict) and all(
            isinstance(config.rope_parameters.get(t), dict) for t in set(types))
        # one rotary table per layer type when the config gives each its own (Gemma 3's local base)
        self.rotaries = nn.ModuleDict({t: make_rotary(config, t if per_type else None) for t in sorted(set(types))})
        self.layers = nn.ModuleList(GemmaDecoderLayer(config, self.rotaries[types[i]], i, qk_norm)
                                    for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        for rotary in self.rotaries.values():
            rotary.prepare(positions)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class Gemma2ForCausalLM(LlamaForCausalLM):
    qk_norm = False

    def build_model(self, config: Any) -> nn.Module:
        return GemmaModel(config, self.qk_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    qk_norm = True
