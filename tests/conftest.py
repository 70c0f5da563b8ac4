"""Shared fixtures: the real default model, tiny random Llama models, and a greedy HF reference."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray listens on loopback only
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
# the suite's many engines would each fault in their whole KV cache (2 GiB by default) while cores
# idle; tests/test_kv_prefault.py turns it back on for the engines it checks
os.environ.setdefault("ENGINE_KV_PREFAULT", "0")


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    from engine.models.default_model import resolve_default_model

    return resolve_default_model()


def make_tiny_llama(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = False,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    **extra,
) -> Path:
    """Saves a randomly initialised Llama with the default model's tokenizer (vocab 49152)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        **extra,
    )
    model = LlamaForCausalLM(config).eval()
    # larger-than-default weights make the logits less flat, so greedy ties are rare
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        src = tokenizer_dir / name
        if src.exists():
            shutil.copy(src, out_dir / name)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory, default_model_path) -> Path:
    """A 2-layer GQA Llama with random weights (sizes divide evenly by 2 for TP tests)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), default_model_path)


_HF_GREEDY: dict[tuple[str, tuple[int, ...], int], dict] = {}  # the session's references, by prompt


def hf_greedy(model_path: Path, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy continuations from transformers, one prompt at a time, with each step's top-2 logit
    gap. A plain decode loop (not ``generate``) so EOS is an ordinary token, as with ignore_eos.
    Each (model, prompt, length) is computed once per session: the golden test files share them."""
    keys = [(str(model_path), tuple(ids), max_new_tokens) for ids in prompt_ids]
    missing = [k for k in dict.fromkeys(keys) if k not in _HF_GREEDY]
    if missing:
        _HF_GREEDY.update(zip(missing, _hf_greedy(model_path, [list(k[1]) for k in missing], max_new_tokens)))
    return [{"tokens": list(_HF_GREEDY[k]["tokens"]), "gaps": list(_HF_GREEDY[k]["gaps"])} for k in keys]


def _hf_greedy(model_path: Path, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    results = []
    with torch.inference_mode():
        for ids in prompt_ids:
            out = model(torch.tensor([ids]), use_cache=True)
            tokens, gaps = [], []
            for _ in range(max_new_tokens):
                logits = out.logits[0, -1].float()
                top2 = logits.topk(2)
                gaps.append(float(top2.values[0] - top2.values[1]))
                tok = int(top2.indices[0])
                tokens.append(tok)
                out = model(torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
            results.append({"tokens": tokens, "gaps": gaps})
    return results


def assert_greedy_match(got: list[int], ref: dict, tie_eps: float = 1e-3, label: str = "") -> None:
    """Equal token for token. A first difference is accepted only at a step where the reference's
    top-2 logits are within ``tie_eps`` (a near-tie that fp32 summation order can flip); the
    tokens after such a divergence are not compared."""
    ref_tokens, gaps = ref["tokens"], ref["gaps"]
    n = min(len(got), len(ref_tokens))
    for i in range(n):
        if got[i] != ref_tokens[i]:
            if gaps[i] < tie_eps:
                return  # divergence right at a near-tie: acceptable, and nothing after it compares
            raise AssertionError(
                f"{label}: token {i} differs: got {got[i]}, transformers {ref_tokens[i]} "
                f"(top-2 gap {gaps[i]:.3g}); got {got[: i + 1]} vs {ref_tokens[: i + 1]}"
            )
    assert len(got) == len(ref_tokens), f"{label}: got {len(got)} tokens, transformers {len(ref_tokens)}"
