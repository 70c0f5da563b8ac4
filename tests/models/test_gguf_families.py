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
from tests.models.gguf_file import q8_round_trip, round_trip, write_gguf
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


def q4_k_m_type(name: str) -> int | None:
    """llama.cpp's Q4_K_M choice for a 2-layer model: Q4_K, with Q6_K for the output and for attn_v
    and ffn_down in the layers it gives more bits (here the last one); one Q5_K tensor (a Q5_K_M
    file's type) so that every k-quant runs."""
    from engine.layers.quantization.gguf_blocks import Q4_K, Q5_K, Q6_K

    if name == "output.weight" or name in ("blk.1.attn_v.weight", "blk.1.ffn_down.weight"):
        return Q6_K
    if name == "blk.1.attn_output.weight":
        return Q5_K
    return Q4_K


def test_q4_k_m_file_keeps_its_k_quants_and_matches_its_dequantized_reference(tmp_path, default_model_path):
    """A Q4_K_M-style llama file (rows of 256 and 512 values: whole super-blocks) loads with every
    weight kept in its k-quant blocks, layer 1's fused qkv as Q4_K and Q6_K parts, and its greedy
    tokens equal transformers' on the dequantized weights, batched and at batch 1."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.layers.quantization.gguf import GGUFPartsLinearMethod
    from engine.layers.quantization.gguf_blocks import Q4_K, Q6_K
    from engine.models.default_model import find_default_gguf

    config = LlamaConfig(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    hf_dir = save_tiny(config, tmp_path / "hf", default_model_path)
    path = write_gguf(hf_dir, tmp_path / "tiny-llama-Q4_K_M.gguf", find_default_gguf(), types=q4_k_m_type)
    ref_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ref_model = round_trip(ref_model, q4_k_m_type)
    refs = [_hf_greedy(ref_model, p, 10) for p in PROMPTS]
    llm = LLM(str(path), num_gpu_blocks_override=64, max_model_len=256)
    try:
        model = llm.llm_engine.executor.worker.runner.model
        assert all(getattr(m, "gguf_k", None) for m in model.modules() if hasattr(m, "linear_method"))
        qkv = model.model.layers[1].self_attn.qkv_proj
        assert isinstance(qkv.linear_method, GGUFPartsLinearMethod)
        assert [p.type_id for p in qkv.gguf_parts] == [Q4_K, Q4_K, Q6_K]
        assert model.model.layers[0].self_attn.qkv_proj.gguf_type == Q4_K
        assert model.lm_head.gguf_type == Q6_K and model.model.embed_tokens.gguf_type == Q4_K
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
        batched = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        for i, (out, ref) in enumerate(zip(batched, refs)):
            assert_greedy_match(list(out.outputs[0].token_ids), ref, label=f"Q4_K_M prompt {i}")
        single = llm.generate([{"prompt_token_ids": PROMPTS[1]}], params, use_tqdm=False)
        assert_greedy_match(list(single[0].outputs[0].token_ids), refs[1], label="Q4_K_M alone")
    finally:
        llm.shutdown()
