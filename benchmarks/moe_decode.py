"""MoE decode at batch 1 reads only the active experts: bytes and time per step against floors.

    python benchmarks/moe_decode.py                      # a random Mixtral-shaped model, saved to a temp dir
    python benchmarks/moe_decode.py --model DIR          # any MoE model directory

For one request decoding alone it reports the expert weight bytes the FusedMoE layers read per
step (counted by the layers), the step's active-parameter bytes (everything but the unchosen
experts: the dense floor an MoE step can reach) beside all the weights' bytes, and the measured
step time beside both bandwidth floors (bytes / read bandwidth measured in the same run).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks.ceilings import measure_bandwidth
from benchmarks.throughput import engine_decode_step_s


def make_model(out: Path, hidden: int, inter: int, experts: int, layers: int, dense: bool = False) -> Path:
    """A random Mixtral (or, with ``dense``, the Llama whose MLP is as wide as the two active experts
    together: the same bytes a step must read) with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    from engine.models.default_model import resolve_default_model

    common = dict(vocab_size=1024, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=hidden // 64,
                  num_key_value_heads=max(1, hidden // 256), max_position_embeddings=512, bos_token_id=1,
                  eos_token_id=2)
    if dense:
        model = LlamaForCausalLM(LlamaConfig(**common, intermediate_size=2 * inter))
    else:
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=inter, num_local_experts=experts,
                                                 num_experts_per_tok=2))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05) if p.dim() >= 2 else p.fill_(1.0)
    model.eval().save_pretrained(out, safe_serialization=True)
    tokenizer = resolve_default_model()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, out / name)
    return out


def weight_bytes(model) -> tuple[int, int]:
    """(all parameter bytes, embedding bytes): a step reads one embedding row, not the table."""
    seen, total = set(), 0
    for t in model.parameters():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    embed = model.model.embed_tokens.weight
    return total, embed.numel() * embed.element_size()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    from engine import LLM
    from engine.layers.fused_moe import FusedMoE

    sizes = (args.hidden, args.intermediate, args.experts, args.layers)
    path = Path(args.model) if args.model else make_model(Path(tempfile.mkdtemp()), *sizes)
    kw = dict(kv_cache_memory_bytes=64 << 20, max_model_len=512, enforce_eager=True)  # both run eagerly
    llm = LLM(str(path), **kw)
    model = llm.llm_engine.executor.worker.runner.model
    moes = [m for m in model.modules() if isinstance(m, FusedMoE)]
    experts = sum((m.w13_weight.numel() + m.w2_weight.numel()) * m.w13_weight.element_size() for m in moes)
    total, embed = weight_bytes(model)
    active_experts = sum((m.w13_weight.numel() + m.w2_weight.numel()) * 4 * m.top_k // m.num_experts for m in moes)
    active = total - embed - experts + active_experts
    for m in moes:
        m.expert_bytes_read = 0
    engine_decode_step_s(llm, [17], args.steps)  # a 1-token prompt: its prefill reads what a decode step reads
    counted = sum(m.expert_bytes_read for m in moes) / args.steps
    moe_s = engine_decode_step_s(llm, list(range(3, 35)), args.steps)
    llm.shutdown()
    dense_s = None
    if args.model is None:
        dense = LLM(str(make_model(Path(tempfile.mkdtemp()), *sizes, dense=True)), **kw)
        dense_total, dense_embed = weight_bytes(dense.llm_engine.executor.worker.runner.model)
        dense_s = engine_decode_step_s(dense, list(range(3, 35)), args.steps)
        dense.shutdown()
    read_gbps, _ = measure_bandwidth()
    print(f"model: {path}  ({len(moes)} MoE layers, {moes[0].num_experts} experts, top {moes[0].top_k}), fp32")
    print(f"expert bytes read per decode step (counted): {counted / 1e6:.1f} MB; active experts' "
          f"{active_experts / 1e6:.1f} MB; all experts {experts / 1e6:.1f} MB")
    print(f"bytes a step must read: active parameters {active / 1e6:.1f} MB; every weight {(total - embed) / 1e6:.1f} MB")
    print(f"read bandwidth {read_gbps:.1f} GB/s -> floors {active / read_gbps / 1e6:.2f} ms (active), "
          f"{(total - embed) / read_gbps / 1e6:.2f} ms (every weight)")
    print(f"MoE decode step at batch 1 (eager): {moe_s * 1e3:.2f} ms")
    if dense_s is not None:
        print(f"dense model of the same active bytes ({(dense_total - dense_embed) / 1e6:.1f} MB), eager: "
              f"{dense_s * 1e3:.2f} ms -> MoE/dense {moe_s / dense_s:.2f}")


if __name__ == "__main__":
    main()
