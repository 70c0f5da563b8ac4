"""Offline throughput: the engine against Hugging Face transformers, measured in one run.

    python benchmarks/throughput.py                                  # 64 requests, all baselines (~20 min)
    python benchmarks/throughput.py --baselines none                 # the engine only
    python benchmarks/throughput.py --baseline-requests 16           # baselines on the first 16 requests
    python benchmarks/throughput.py --quantization int8 --baselines none
    python benchmarks/throughput.py --tensor-parallel-size 2 --baselines none

A seeded synthetic workload: N requests with random token-id prompts of 16..512 tokens and outputs of
16..256 tokens, ignore_eos (every request generates exactly its output length). Reported for each
system: useful generated tokens/s (the requested output tokens, nothing for padding or for tokens a
static batch generates past a request's length) and, for the engine, processed tokens/s (prompt +
output) as a fraction of the fp32 compute ceiling, and single-request decode as a fraction of the
bandwidth floor; ceilings are measured in this run (benchmarks/ceilings.py), before and after the
engine, and the higher of the two measurements is used; single-request decode is the fastest of
three runs before the workload and three after.

Baselines (transformers, same weights and dtype, greedy):
- sequential: `generate` one request at a time;
- static: batches of 16 in arrival order, left-padded, every request of a batch generating the
  batch's longest output (`min_new_tokens` = `max_new_tokens`).
They run on the first `--baseline-requests` requests (default: all) and are compared as rates.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ceilings import Ceilings, measure, model_costs  # noqa: E402


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def head(self, n: int) -> "Workload":
        return Workload(self.prompts[:n], self.output_lens[:n])


def make_workload(n: int, vocab_size: int, seed: int, prompt_range=(16, 512), output_range=(16, 256)) -> Workload:
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        prompts.append([rng.randrange(100, vocab_size) for _ in range(plen)])  # ids < 100: special tokens
        outs.append(rng.randint(*output_range))
    return Workload(prompts, outs)


def run_engine(llm, wl: Workload) -> float:
    from engine.sampling_params import SamplingParams

    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=True) for o in wl.output_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in wl.prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != wl.output_lens:
        raise RuntimeError("the engine generated other lengths than requested")
    return elapsed


def engine_decode_step_s(llm, prompt: list[int], n: int = 128) -> float:
    """Seconds per decode step of one request alone (first token to last, per token)."""
    from engine.sampling_params import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                       use_tqdm=False)[0]
    m = out.metrics
    return (m.finished_time - m.first_token_time) / (n - 1)


def load_hf(path: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.inference_mode()
def run_hf_sequential(model, wl: Workload) -> float:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for p, o in tqdm(list(zip(wl.prompts, wl.output_lens)), desc="transformers sequential"):
        ids = torch.tensor([p])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=o, min_new_tokens=o,
                             do_sample=False, pad_token_id=0)
        if out.shape[1] - ids.shape[1] != o:
            raise RuntimeError("transformers generated another length than requested")
    return time.perf_counter() - start


@torch.inference_mode()
def run_hf_static(model, wl: Workload, batch: int = 16) -> float:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    for i in tqdm(range(0, len(wl.prompts), batch), desc=f"transformers static batch {batch}"):
        prompts, outs = wl.prompts[i : i + batch], wl.output_lens[i : i + batch]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        m = max(outs)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=m, min_new_tokens=m, do_sample=False,
                             pad_token_id=0)
        if out.shape[1] - width != m:
            raise RuntimeError("transformers generated another length than requested")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description="Offline throughput: engine vs transformers")
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default=None, choices=["int8"])
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--baselines", default="all", choices=["all", "static", "sequential", "none"])
    p.add_argument("--baseline-requests", type=int, default=None, help="requests for the baselines (default: all)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()

    from engine.config import load_hf_config
    from engine.entrypoints.llm import LLM
    from engine.models.default_model import resolve_model_path

    path = resolve_model_path(args.model)
    hf_config = load_hf_config(path)
    wl = make_workload(args.num_requests, hf_config.vocab_size, args.seed)
    print(f"workload: {args.num_requests} requests, {wl.num_prompt_tokens} prompt tokens, "
          f"{wl.num_output_tokens} output tokens (seed {args.seed})")
    ceilings: Ceilings = measure()
    wbytes = 1.0 if args.quantization == "int8" else torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    costs = model_costs(hf_config, wbytes)
    fp32_costs = model_costs(hf_config, 4.0)
    print(f"ceilings ({ceilings.threads} threads): read {ceilings.read_gbps:.1f} GB/s, fp32 matmul "
          f"{ceilings.fp32_gflops:.0f} GFLOP/s, int8 {ceilings.int8_gops:.0f} GOP/s")

    results: dict = {"args": vars(args)}
    llm = LLM(str(path), dtype=args.dtype, quantization=args.quantization,
              tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    engine_decode_step_s(llm, wl.prompts[0][:32], 8)  # warm-up
    steps = [engine_decode_step_s(llm, wl.prompts[1][:32]) for _ in range(3)]
    t_engine = run_engine(llm, wl)
    # both measured again after the workload: the machine is shared, so each side takes its best
    # of both moments (the ceilings their highest, the decode step its fastest)
    steps += [engine_decode_step_s(llm, wl.prompts[1][:32]) for _ in range(3)]
    step = min(steps)
    ceilings = ceilings.best(measure())
    floor = costs.decode_floor_s(ceilings, context=100)
    print(f"ceilings, best of before and after the engine: read {ceilings.read_gbps:.1f} GB/s, fp32 matmul "
          f"{ceilings.fp32_gflops:.0f} GFLOP/s")
    processed = wl.num_prompt_tokens + wl.num_output_tokens
    mean_ctx = (wl.num_prompt_tokens + wl.num_output_tokens / 2) / args.num_requests
    ceiling_tps = fp32_costs.compute_ceiling_tps(ceilings, int(mean_ctx / 2))
    engine = {
        "seconds": t_engine,
        "useful_tok_s": wl.num_output_tokens / t_engine,
        "processed_tok_s": processed / t_engine,
        "fraction_of_fp32_compute_ceiling": processed / t_engine / ceiling_tps,
        "single_request_decode_ms": step * 1e3,
        "decode_floor_ms": floor * 1e3,
        "fraction_of_bandwidth_floor": floor / step,
    }
    results["engine"] = engine
    results["ceilings"] = asdict(ceilings)
    llm.shutdown()
    del llm
    gc.collect()

    label = f"engine ({args.dtype}{', ' + args.quantization if args.quantization else ''}, tp={args.tensor_parallel_size})"
    rows = [(label, args.num_requests, t_engine, engine["useful_tok_s"])]
    if args.baselines != "none":
        nb = args.baseline_requests or args.num_requests
        sub = wl.head(nb)
        model = load_hf(str(path), getattr(torch, args.dtype))
        if args.baselines in ("all", "static"):
            t = run_hf_static(model, sub)
            results["hf_static"] = {"requests": nb, "seconds": t, "useful_tok_s": sub.num_output_tokens / t}
            rows.append(("transformers static batch 16", nb, t, sub.num_output_tokens / t))
        if args.baselines in ("all", "sequential"):
            t = run_hf_sequential(model, sub)
            results["hf_sequential"] = {"requests": nb, "seconds": t, "useful_tok_s": sub.num_output_tokens / t}
            rows.append(("transformers one at a time", nb, t, sub.num_output_tokens / t))

    print()
    print(f"{'system':44s} {'requests':>8s} {'seconds':>9s} {'useful tok/s':>13s} {'engine x':>9s}")
    for name, n, t, tps in rows:
        print(f"{name:44s} {n:8d} {t:9.1f} {tps:13.1f} {engine['useful_tok_s'] / tps:9.2f}")
    print()
    print(f"engine processed {engine['processed_tok_s']:.0f} tokens/s = {engine['fraction_of_fp32_compute_ceiling']:.0%} "
          f"of the fp32 compute ceiling ({ceiling_tps:.0f} tokens/s at mean context {int(mean_ctx / 2)})")
    print(f"single-request decode {engine['single_request_decode_ms']:.1f} ms/step vs floor "
          f"{engine['decode_floor_ms']:.1f} ms = {engine['fraction_of_bandwidth_floor']:.0%} of the bandwidth floor")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
