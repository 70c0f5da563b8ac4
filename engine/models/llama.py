"""The Llama family (Llama 2/3.x, Mistral, Qwen2, Qwen3, Phi-3, SmolLM) and the parts other families
reuse: declarative; a family differs by a :class:`DecoderSpec` (layer choices), sharding lives in
the layers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from engine.layers.activation import get_act_and_mul
from engine.layers.attention import Attention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_parameters


def head_dim_of(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_sliding_window(config: Any, layer_idx: int) -> int:
    """The layer's window (0 = full attention): ``sliding_window`` on every layer, or only on the
    layers ``layer_types`` marks "sliding_attention" (Gemma, Qwen2 with use_sliding_window)."""
    window = getattr(config, "sliding_window", None) or 0
    types = getattr(config, "layer_types", None)
    if window and types is not None and types[layer_idx] != "sliding_attention":
        return 0
    return int(window)


class LlamaAttention(nn.Module):
    """QKV projection, optional per-head q/k norm (Qwen3, Gemma 3), rotary, paged attention, output.
    ``scale`` defaults to head_dim^-0.5; ``softcap`` is Gemma 2's attention logit cap."""

    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int = 0, *, bias: bool = False,
                 qk_norm: type[RMSNorm] | None = None, scale: float | None = None, softcap: float = 0.0) -> None:
        super().__init__()
        hidden = config.hidden_size
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(hidden, head_dim, num_heads, num_kv_heads, bias=bias)
        self.o_proj = RowParallelLinear(
            num_heads * head_dim, hidden, bias=bool(getattr(config, "attention_bias", False)),
            input_heads=self.qkv_proj.layout.q_heads, head_dim=head_dim,  # padded heads: zero columns
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = head_dim
        self.rotary_emb = rotary_emb
        if qk_norm is not None:
            self.q_norm = qk_norm(head_dim, config.rms_norm_eps)
            self.k_norm = qk_norm(head_dim, config.rms_norm_eps)
        self.qk_norm = qk_norm is not None
        self.attn = Attention(self.num_heads, head_dim, scale if scale is not None else head_dim**-0.5,
                              self.num_kv_heads, layer_sliding_window(config, layer_idx), softcap)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # RMSNorm over each head's vector
            q, k = self.q_norm.forward_heads(q), self.k_norm.forward_heads(k)
        q, k = self.rotary_emb(q, k)
        return self.o_proj(self.attn(q, k, v))


class LlamaMLP(nn.Module):
    """down(act(gate) * up) with gate and up in one column-parallel matrix."""

    def __init__(self, config: Any, intermediate_size: int | None = None, bias: bool | None = None) -> None:
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        bias = bool(getattr(config, "mlp_bias", False)) if bias is None else bias
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=bias)
        self.act = get_act_and_mul(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


@dataclass(frozen=True)
class DecoderSpec:
    """What a family of the Llama shape chooses: the attention's options and the MLP block."""

    qkv_bias: bool | None = None  # None: the config's qkv_bias / attention_bias
    qk_norm: type[RMSNorm] | None = None  # Qwen3: RMSNorm over each head of q and k
    mlp: Callable[[Any, int], nn.Module] = lambda config, layer_idx: LlamaMLP(config)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, rotary_emb: RotaryEmbedding, layer_idx: int = 0,
                 spec: DecoderSpec = DecoderSpec()) -> None:
        super().__init__()
        bias = spec.qkv_bias
        if bias is None:  # Qwen2-MoE names it qkv_bias, the others attention_bias
            bias = bool(getattr(config, "qkv_bias", getattr(config, "attention_bias", False)))
        self.self_attn = LlamaAttention(config, rotary_emb, layer_idx, bias=bias, qk_norm=spec.qk_norm)
        self.mlp = spec.mlp(config, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


def make_rotary(config: Any, layer_type: str | None = None) -> RotaryEmbedding:
    theta, scaling = rope_parameters(config, layer_type)
    max_pos = config.max_position_embeddings
    return RotaryEmbedding(head_dim_of(config), max_pos, theta, scaling, max_pos)


class LlamaModel(nn.Module):
    def __init__(self, config: Any, spec: DecoderSpec = DecoderSpec()) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = make_rotary(config)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, self.rotary_emb, i, spec)
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        self.rotary_emb.prepare(positions)  # cos/sin looked up once for all layers
        residual = None
        for layer in self.layers:
            hidden, residual = layer(hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    spec = DecoderSpec()
    # checkpoint name fragment -> (our parameter fragment, shard id); fused checkpoint tensors
    # (Phi-3's qkv_proj and gate_up_proj) already carry our names and load with shard id None
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.model = self.build_model(config)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def build_model(self, config: Any) -> nn.Module:
        return LlamaModel(config, self.spec)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Hidden states of every scheduled token: [T, hidden]."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for the selected positions only: [N, vocab]."""
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    """Llama with ``sliding_window`` on every layer (honoured by every attention backend)."""


class Phi3ForCausalLM(LlamaForCausalLM):
    """Llama with fused qkv_proj / gate_up_proj checkpoint tensors and LongRoPE (rope_scaling.py)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    spec = DecoderSpec(qkv_bias=True)


class Qwen3ForCausalLM(LlamaForCausalLM):
    spec = DecoderSpec(qk_norm=RMSNorm)
