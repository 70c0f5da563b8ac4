"""Where the time of an engine step goes: scheduler, input preparation, model (matmuls, attention,
the rest), LM head, sampling, output processing and whatever Python is left.

    python benchmarks/profile_step.py                    # one request decoding alone, and a batch of 64
    python benchmarks/profile_step.py --batch 16 --context 256
    python benchmarks/profile_step.py --batch 1 --context 32 --quantization gguf
    python benchmarks/profile_step.py --batch 64 --context 256 --quantization int8 --kv-cache-dtype int8
    python benchmarks/profile_step.py --batch 48 --context 160 --temperature 1   # random sampling
    python benchmarks/profile_step.py --prefill --batch 4 --context 512  # a step prefilling 4 x 512 tokens

Each configuration is warmed up, then ``--steps`` decode steps (with ``--prefill``: steps that each
prefill ``--batch`` fresh prompts of ``--context`` tokens, as the 64-request workload's first steps do) are timed with wall clocks around the
engine's parts, a clock around every C kernel call (inside replayed kernel plans too, timed in C),
and the torch profiler for the torch ops left; figures are milliseconds per step.
"""
from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch

from engine.attention.kv_format import KV_CACHE_DTYPES

MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm"}
ATTENTION_OPS = {"aten::_scaled_dot_product_flash_attention_for_cpu", "aten::index_select", "aten::index_copy_",
                 "aten::_scaled_dot_product_attention_math", "aten::index"}


class Timers:
    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, label: str) -> None:
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.totals[label] += time.perf_counter() - t

        setattr(obj, name, timed)


def time_c_kernels(runner):
    """Times every fp32/int8 C kernel from now on, eager calls and calls inside replayed kernel
    plans (per call, in C); returns a function giving seconds by kernel name so far."""
    from engine.kernels.cpu import ops as cpu_ops

    totals: dict[str, float] = defaultdict(float)
    kernels = cpu_ops.load()
    if kernels is not None:
        call = kernels._call

        def timed(name, args, keep, plan_args=None):
            t = time.perf_counter()
            try:
                return call(name, args, keep, plan_args)
            finally:
                totals[name] += time.perf_counter() - t

        kernels._call = timed
    plans = [p.plan for p in getattr(runner.graph_runner, "plans", {}).values() if p is not None]
    for plan in plans:
        plan.profile()

    def seconds() -> dict[str, float]:
        out = dict(totals)
        for plan in plans:
            for name, sec in plan.time_by_kernel().items():
                out[f"plan: {name}"] = out.get(f"plan: {name}", 0.0) + sec
        return out

    return seconds


def profile(batch: int, context: int, steps: int, seed: int = 0, quantization: str | None = None,
            kv_cache_dtype: str = "auto", temperature: float = 0.0, prefill: bool = False) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(enable_prefix_caching=False, quantization=quantization, kv_cache_dtype=kv_cache_dtype)
    engine = llm.llm_engine
    runner = engine.executor.worker.runner
    rng = random.Random(seed)
    added = iter(range(1 << 30))

    def add_prompts(max_tokens: int) -> None:
        for _ in range(batch):
            prompt = [rng.randrange(100, 49152) for _ in range(context)]
            engine.add_request(f"p{next(added)}", {"prompt_token_ids": prompt},
                               SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True))

    def step() -> None:
        if prefill:  # fresh prompts that end with their first token: every step is a prefill step
            add_prompts(1)
        engine.step()

    if not prefill:
        add_prompts(steps * 3 + 16)
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill everything first
    for _ in range(5 if not prefill else 2):
        step()
    timers = Timers()
    timers.wrap(engine.scheduler, "schedule", "scheduler")
    timers.wrap(engine.scheduler, "update_from_output", "scheduler")
    timers.wrap(engine.output_processor, "process", "detokenize / stop checks")
    timers.wrap(runner, "_prepare", "input preparation")
    timers.wrap(runner, "_forward", "model forward")
    timers.wrap(runner.model, "compute_logits", "LM head")
    timers.wrap(runner, "sampler", "sampling")
    kernel_time = time_c_kernels(runner)
    wall = 0.0
    for _ in range(steps):
        if prefill:
            add_prompts(1)
        start = time.perf_counter()
        engine.step()
        wall += time.perf_counter() - start
    wall = wall / steps * 1e3
    parts = {k: v / steps * 1e3 for k, v in timers.totals.items()}
    kernels = {k: v / steps * 1e3 for k, v in kernel_time().items()}
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(max(2, steps // 4)):
            step()
    n_prof = max(2, steps // 4)
    ops = {"matmul": 0.0, "attention (gather, SDPA, KV write)": 0.0}
    for evt in prof.key_averages():
        if evt.key in MATMUL_OPS:
            ops["matmul"] += evt.self_cpu_time_total / 1e3 / n_prof
        elif evt.key in ATTENTION_OPS:
            ops["attention (gather, SDPA, KV write)"] += evt.self_cpu_time_total / 1e3 / n_prof
    replayed = getattr(runner.graph_runner, "num_replays", 0)
    kind, tokens = ("prefill", batch * context) if prefill else ("decode", batch)
    print(f"\n== batch {batch}, context {context}: {wall:.1f} ms per {kind} step ({tokens / wall * 1e3:.0f} tokens/s)"
          f"{'; decode steps replayed as kernel plans' if replayed else ''}")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:34s} {v:8.2f} ms  {v / wall:6.1%}")
    print(f"  {'engine Python outside these':34s} {wall - sum(parts.values()):8.2f} ms")
    if kernels:
        print("  C kernels (model forward and LM head; 'plan' = inside a replayed plan):")
        for k, v in sorted(kernels.items(), key=lambda kv: -kv[1]):
            print(f"    {k:40s} {v:8.2f} ms")
    if any(ops.values()):
        print("  torch ops inside the model and LM head (torch profiler, which slows small ops):")
        for k, v in ops.items():
            print(f"    {k:40s} {v:8.2f} ms")
    llm.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quantization", default=None, help="e.g. gguf (the default model's Q4_1 blocks) or int8")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES))
    p.add_argument("--prefill", action="store_true",
                   help="time steps that prefill --batch fresh prompts of --context tokens (not decode steps)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="> 0: random sampling (what an OpenAI client gets without a temperature: 1.0)")
    args = p.parse_args()
    configs = [(args.batch, args.context)] if args.batch else [(1, 32), (64, 256)]
    for batch, context in configs:
        profile(batch, context, args.steps, quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype,
                temperature=args.temperature, prefill=args.prefill)


if __name__ == "__main__":
    main()
