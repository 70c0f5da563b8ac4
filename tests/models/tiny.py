"""Tiny random models of every supported family, saved as Hugging Face model directories, and the
transformers references the engine is held to (eager attention: the exact maths, soft-caps included)."""
from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch

VOCAB = 512  # prompts are token ids; generated ids decode with SmolLM2's tokenizer (ids < 512 exist there)
WINDOW = 16  # sliding windows shorter than every prompt
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
              tie_word_embeddings=False)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def family_configs() -> dict[str, Any]:
    """family name -> a transformers config (2-3 layers, hidden 64, GQA 4/2 heads of 16)."""
    import transformers as tf

    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}
    phi_short = [1.0 + 0.05 * i for i in range(8)]
    longrope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": phi_short,
                "long_factor": [2.0 * f for f in phi_short], "original_max_position_embeddings": 128}
    gemma = dict(COMMON, head_dim=16, query_pre_attn_scalar=32, sliding_window=WINDOW, hidden_activation="gelu_pytorch_tanh")
    return {
        "llama3": tf.LlamaConfig(**COMMON, rope_parameters=llama3),
        "llama-yarn": tf.LlamaConfig(**COMMON, rope_parameters=yarn),
        "mistral": tf.MistralConfig(**COMMON, head_dim=16, sliding_window=WINDOW),
        "qwen2": tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        "qwen3": tf.Qwen3Config(**COMMON, head_dim=16),
        "gemma2": tf.Gemma2Config(**gemma, attn_logit_softcapping=2.0, final_logit_softcapping=15.0,
                                  layer_types=["sliding_attention", "full_attention"]),
        "gemma3": tf.Gemma3TextConfig(**dict(gemma, num_hidden_layers=3),
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                      rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                       "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                          "rope_theta": 1000000.0}}),
        "phi3": tf.Phi3Config(**dict(COMMON, num_key_value_heads=2), original_max_position_embeddings=128,
                              rope_parameters=longrope, sliding_window=24, pad_token_id=0),
        "mixtral": tf.MixtralConfig(**COMMON, head_dim=16, num_local_experts=8, num_experts_per_tok=2),
        "qwen2-moe": tf.Qwen2MoeConfig(**COMMON, **MOE, num_experts=8, shared_expert_intermediate_size=64,
                                       norm_topk_prob=False, mlp_only_layers=[1]),
        "qwen3-moe": tf.Qwen3MoeConfig(**COMMON, **MOE, head_dim=16, num_experts=8, norm_topk_prob=True),
    }


def save_tiny(config: Any, out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """Random weights (larger than the default init, so greedy near-ties are rare; norm weights
    random too, so Gemma's 1 + w matters) saved with the default model's tokenizer files."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.normal_(0 if "gemma" in config.model_type else 1, 0.1)
            else:
                p.normal_(0, 0.02)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def prompt_ids(n: int = 4, seed: int = 0) -> list[list[int]]:
    """Prompts of 34-61 tokens (all longer than the windows); the first two share a 20-token prefix,
    so prefix caching serves part of the second from the first's blocks."""
    rng = random.Random(seed)
    prefix = [rng.randrange(3, VOCAB) for _ in range(20)]
    lengths = [41, 52, 61, 34, 47, 58][:n]
    out = []
    for i, length in enumerate(lengths):
        head = prefix if i < 2 else [rng.randrange(3, VOCAB) for _ in range(20)]
        out.append(head + [rng.randrange(3, VOCAB) for _ in range(length - 20)])
    return out


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """As tests/conftest.py's hf_greedy, with eager attention (Gemma 2's soft-cap is eager-only)."""
    model = load_hf(path)
    results = []
    with torch.inference_mode():
        for ids in prompts:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens, gaps = [], []
            for _ in range(max_new_tokens):
                top2 = out.logits[0, -1].float().topk(2)
                gaps.append(float(top2.values[0] - top2.values[1]))
                tokens.append(int(top2.indices[0]))
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            results.append({"tokens": tokens, "gaps": gaps})
    return results


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return load_hf(path)(torch.tensor([ids])).logits[0].float()


def engine_prefill_logits(path: Path, ids: list[int], backend: str, block_size: int = 16) -> torch.Tensor:
    """The engine's logits for every position of one prefill, run through ``backend`` on a scratch
    cache (the model built and loaded as the runner does)."""
    from engine.attention.backends.selector import get_attention_backend
    from engine.attention.metadata import attention_context, build_attention_metadata
    from engine.models.hf_config import load_hf_config
    from engine.models.loader import load_model

    cpu = torch.device("cpu")
    model = load_model(load_hf_config(path), path, torch.float32, cpu, show_progress=False)
    attn = get_attention_backend(backend, cpu)
    nblocks = -(-len(ids) // block_size)
    from engine.layers.attention import Attention

    for layer in (m for m in model.modules() if isinstance(m, Attention)):
        shape = (nblocks, block_size, layer.num_kv_heads, layer.head_dim)
        layer.k_cache, layer.v_cache, layer.backend = torch.zeros(shape), torch.zeros(shape), attn
    meta, positions = build_attention_metadata([len(ids)], [0], [list(range(nblocks))], block_size, cpu)
    with torch.inference_mode(), attention_context(meta):
        hidden = model(torch.tensor(ids), positions)
        return model.compute_logits(hidden).float()
