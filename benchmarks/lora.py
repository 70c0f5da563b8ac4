"""Multi-LoRA serving cost: the 64-request workload on the base model vs spread over 4 rank-16
adapters, and single-request decode with one adapter vs the base model (docs/lora.md).

    python benchmarks/lora.py                     # SmolLM2, 64 requests, fp32 (~10 min on 2 cores)
    python benchmarks/lora.py --num-requests 16   # a quicker look

The workload is benchmarks/throughput.py's (seeded random prompts of 16..512 tokens, outputs of
16..256, ignore_eos). Adapters are random rank-16 PEFT adapters on every projection (q, k, v, o,
gate, up, down), written with peft's save_pretrained into a temporary directory. Three settings
are timed: the base model on an engine without LoRA (``base``), the base model on an engine with
``enable_lora`` (``base, LoRA engine``: what enabling LoRA costs requests that use no adapter) and
the workload's requests spread round-robin over the 4 adapters (``4 adapters``). Both engines are
alive at once and the measurements alternate between them (the machine is shared).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import engine_decode_step_s, make_workload, run_engine  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(base: Path, out: Path, rank: int, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                  lora_dropout=0.0, task_type="CAUSAL_LM"))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    peft_model.save_pretrained(out, safe_serialization=True)
    return out


def run_with_loras(llm, wl, loras) -> float:
    """run_engine with request i on adapter i % len(loras)."""
    import time

    from engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in wl.output_lens]
    reqs = [loras[i % len(loras)] for i in range(len(wl.prompts))]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=True, lora_request=reqs)
    elapsed = time.perf_counter() - start
    if [len(o.outputs[0].token_ids) for o in outs] != wl.output_lens:
        raise RuntimeError("the engine generated other lengths than requested")
    return elapsed


def decode_step_with_lora(llm, prompt, lora, n: int = 128) -> float:
    from engine.sampling_params import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                       use_tqdm=False, lora_request=lora)[0]
    m = out.metrics
    return (m.finished_time - m.first_token_time) / (n - 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--num-adapters", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--decode-runs", type=int, default=3, help="single-request decode runs per setting (best is kept)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from engine.config import load_hf_config
    from engine.entrypoints.llm import LLM
    from engine.lora import LoRARequest
    from engine.models.default_model import resolve_model_path

    path = resolve_model_path(args.model)
    wl = make_workload(args.num_requests, load_hf_config(path).vocab_size, args.seed)
    print(f"workload: {args.num_requests} requests, {wl.num_prompt_tokens} prompt tokens, "
          f"{wl.num_output_tokens} output tokens (seed {args.seed})")
    tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    loras = [LoRARequest(f"bench{i}", i + 1, str(random_adapter(path, tmp / f"a{i}", args.rank, i)))
             for i in range(args.num_adapters)]
    common = dict(dtype="float32", enable_prefix_caching=False)
    decode_prompt = wl.prompts[1][:32]
    results: dict = {"args": vars(args)}

    # both engines live side by side and every measurement alternates between them: the machine is
    # shared, and a quiet minute for one side and a busy one for the other would decide the ratio
    base = LLM(str(path), **common)
    lora = LLM(str(path), enable_lora=True, max_loras=args.num_adapters, max_lora_rank=args.rank, **common)
    engine_decode_step_s(base, decode_prompt, 8)  # warm-ups: the decode plan, the adapter's load
    engine_decode_step_s(lora, decode_prompt, 8)
    decode_step_with_lora(lora, decode_prompt, loras[0], 8)
    decodes: dict[str, list[float]] = {"base": [], "lora": [], "base_on_lora_engine": []}
    for _ in range(args.decode_runs):
        decodes["base"].append(engine_decode_step_s(base, decode_prompt))
        decodes["lora"].append(decode_step_with_lora(lora, decode_prompt, loras[0]))
        decodes["base_on_lora_engine"].append(engine_decode_step_s(lora, decode_prompt))
    for k, v in decodes.items():
        results[f"decode_{k}_ms"] = 1e3 * min(v)
    results["workload_base_s"] = run_engine(base, wl)
    results["workload_lora_s"] = run_with_loras(lora, wl, loras)
    results["workload_base_on_lora_engine_s"] = run_engine(lora, wl)
    base.shutdown()
    lora.shutdown()

    n_out = wl.num_output_tokens
    rows = [("base", results["workload_base_s"], results["decode_base_ms"]),
            ("base, LoRA engine", results["workload_base_on_lora_engine_s"], results["decode_base_on_lora_engine_ms"]),
            (f"{args.num_adapters} adapters (rank {args.rank})", results["workload_lora_s"], results["decode_lora_ms"])]
    print(f"\n{'setting':<26} {'workload s':>10} {'output tok/s':>12} {'vs base':>8} {'decode ms':>10} {'vs base':>8}")
    for name, t, d in rows:
        print(f"{name:<26} {t:10.1f} {n_out / t:12.1f} {results['workload_base_s'] / t:8.2f} {d:10.1f} "
              f"{results['decode_base_ms'] / d:8.2f}")
    results["throughput_ratio"] = results["workload_base_s"] / results["workload_lora_s"]
    results["decode_ratio"] = results["decode_base_ms"] / results["decode_lora_ms"]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
