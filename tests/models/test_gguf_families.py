"""GGUF files of other families than the default model's (Qwen2, Qwen3, Gemma 2, Phi-3), written by
the gguf package's writer from tiny random models: ``LLM(path.gguf)`` loads each through the same
path as the default model and its greedy tokens equal transformers' on the model the file was
written from (Qwen3 also with Q8_0 weights, against that model with its weights put through the
gguf package's Q8_0 round trip; kept quantized only for the llama layout, so this one is
dequantized at load). The configs are kept to what a GGUF file can say, so the file describes the
model exactly (transformers' own GGUF reader reads each config back equal, checked when this was
written; it is not the reference here because it spends ~15 s of each test parsing the tokenizer)."""
from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import assert_greedy_match
from tests.models.gguf_file import q8_round_trip, write_gguf
from tests.models.tiny import family_configs, save_tiny

PROMPTS = [[5, 17, 300, 41, 9, 77, 1200, 33] * 3, [902, 4, 4, 18000, 250, 7, 61, 3001, 12, 44, 9]]


def _config(family: str):
    config = family_configs()[family]
    config.vocab_size = 49152  # the default model's tokenizer, copied into the file
    if family == "qwen3":
        config.head_dim = 128  # transformers reads no head_dim for qwen3 GGUFs: its default
    if family == "gemma2":
        config.tie_word_embeddings = True  # Gemma GGUFs have no output tensor
    # what a GGUF file cannot say (llama.cpp's keys have no sliding window for these two and no
    # longrope factors), so that the file describes the model it was written from
    if family == "qwen2":
        config.use_sliding_window, config.sliding_window = False, None
        config.layer_types = ["full_attention"] * config.num_hidden_layers
    if family == "phi3":
        config.sliding_window = None
        config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}
    return config


def _hf_greedy(model, prompt: list[int], n: int) -> dict:
    tokens, gaps = [], []
    with torch.inference_mode():
        out = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            top2 = out.logits[0, -1].float().topk(2)
            gaps.append(float(top2.values[0] - top2.values[1]))
            tokens.append(int(top2.indices[0]))
            out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return {"tokens": tokens, "gaps": gaps}


@pytest.mark.parametrize("family,q8", [("qwen2", False), ("qwen3", False), ("qwen3", True), ("gemma2", False),
                                       ("phi3", False)])
def test_gguf_of_family_loads_and_matches_transformers(tmp_path, default_model_path, family, q8):
    from transformers import AutoModelForCausalLM

    from engine.models.default_model import find_default_gguf

    hf_dir = save_tiny(_config(family), tmp_path / "hf", default_model_path)
    path = write_gguf(hf_dir, tmp_path / f"tiny-{family}{'-q8_0' if q8 else ''}.gguf", find_default_gguf(),
                      quantize_q8=q8)
    ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    if q8:
        ref_model = q8_round_trip(ref_model)
    refs = [_hf_greedy(ref_model, p, 10) for p in PROMPTS]
    llm = LLM(str(path), num_gpu_blocks_override=64, max_model_len=256)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
        for i, (out, ref) in enumerate(zip(outs, refs)):
            assert_greedy_match(list(out.outputs[0].token_ids), ref, label=f"{family} GGUF prompt {i}")
    finally:
        llm.shutdown()
