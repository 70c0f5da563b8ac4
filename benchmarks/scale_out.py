"""Scale-out on Ray, measured on this machine: data-parallel throughput and the pipeline bubble.

  dp   the same seeded batch through one engine in this process (all cores' torch threads) and
       through data_parallel_size=N replicas (N Ray actors, one core's thread each): output tokens/s
  pp   the batch through pipeline_parallel_size=1 (one Ray actor) and =P (P stage actors), the
       latter with each step as one group and as P micro-batches in flight (the default,
       engine/pipeline/micro_batch.py): tokens/s and the bubble, 1 - (sum of the stages' compute
       time) / (P x wall time), i.e. the fraction of stage-time spent waiting

  python benchmarks/scale_out.py [--model PATH] [--num-prompts 32] [--output-len 32] [--dp 2] [--pp 2] [--only dp|pp]

On a 2-core machine expect little or no DP gain (two replicas share the same two cores that one
engine's two torch threads already use) and a PP bubble near 1 - 1/P (a stage idles while the
others compute) when a step is one group; with P micro-batches the stages overlap, but on 2 cores
two stage actors already share the cores, so overlap buys little wall time here. On a real cluster
each replica or stage has its own node: DP throughput scales with the replicas until the router is
the bottleneck, and micro-batches bring PP's bubble from 1 - 1/P towards (P - 1) / (M + P - 1).
"""
from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def workload(n: int, input_words: int, output_len: int):
    from engine import SamplingParams

    prompts = [f"Request {i}: " + " ".join(f"w{(i * 7 + j) % 97}" for j in range(input_words)) for i in range(n)]
    return prompts, SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)


def timed(llm, prompts, params) -> tuple[float, int]:
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up: kernels, plans, first-touch
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - t0, sum(len(o.outputs[0].token_ids) for o in outs)


def bench_dp(args, prompts, params) -> dict:
    from engine import LLM

    common = dict(model=args.model, kv_cache_memory_bytes=args.kv_bytes, max_model_len=args.max_model_len)
    res = {}
    with LLM(**common) as llm:
        s, toks = timed(llm, prompts, params)
        res["dp1_in_process"] = {"seconds": round(s, 2), "output_tok_s": round(toks / s, 1)}
    with LLM(**common, data_parallel_size=args.dp) as llm:
        s, toks = timed(llm, prompts, params)
        res[f"dp{args.dp}"] = {"seconds": round(s, 2), "output_tok_s": round(toks / s, 1),
                               "routed": list(llm.llm_engine.client.router.routed)}
    res["dp_speedup"] = round(res["dp1_in_process"]["seconds"] / res[f"dp{args.dp}"]["seconds"], 2)
    return res


def bench_pp(args, prompts, params) -> dict:
    from engine import LLM

    common = dict(model=args.model, kv_cache_memory_bytes=args.kv_bytes, max_model_len=args.max_model_len,
                  distributed_executor_backend="ray")
    res = {}
    with LLM(**common) as llm:
        s, toks = timed(llm, prompts, params)
        res["pp1_ray"] = {"seconds": round(s, 2), "output_tok_s": round(toks / s, 1)}
    for groups, name in ((1, f"pp{args.pp}_one_group"), (0, f"pp{args.pp}_micro_batches")):
        with LLM(**common, pipeline_parallel_size=args.pp, pipeline_micro_batches=groups) as llm:
            ex = llm.llm_engine.executor
            llm.generate(prompts[:2], params, use_tqdm=False)
            before = {s: b for s, b, _ in ex.stage_timing()}
            t0 = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall = time.perf_counter() - t0
            busy = {s: b - before[s] for s, b, _ in ex.stage_timing()}
            toks = sum(len(o.outputs[0].token_ids) for o in outs)
            res[name] = {"micro_batches": ex.num_micro_batches, "seconds": round(wall, 2),
                         "output_tok_s": round(toks / wall, 1),
                         "stage_busy_s": {str(k): round(v, 2) for k, v in sorted(busy.items())},
                         "bubble": round(1 - sum(busy.values()) / (args.pp * wall), 3)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-words", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--dp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--only", choices=["dp", "pp"], default=None)
    ap.add_argument("--kv-bytes", type=int, default=256 << 20)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = ap.parse_args()
    import ray

    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, logging_level="WARNING")
    prompts, params = workload(args.num_prompts, args.input_words, args.output_len)
    out = {"cores": os.cpu_count(), "num_prompts": args.num_prompts, "output_len": args.output_len}
    try:
        if args.only in (None, "dp"):
            out["dp"] = bench_dp(args, prompts, params)
        if args.only in (None, "pp"):
            out["pp"] = bench_pp(args, prompts, params)
    finally:
        ray.shutdown()
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
