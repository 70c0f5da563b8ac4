"""Where the time of an engine step goes: scheduler, input preparation, model (matmuls, attention,
the rest), LM head, sampling, output processing and whatever Python is left.

    python benchmarks/profile_step.py                    # one request decoding alone, and a batch of 64
    python benchmarks/profile_step.py --batch 16 --context 256

Each configuration is warmed up, then ``--steps`` decode steps are timed with wall clocks around the
engine's parts and the torch profiler inside the model; figures are milliseconds per step.
"""
from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch

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


def profile(batch: int, context: int, steps: int, seed: int = 0) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from engine.entrypoints.llm import LLM
    from engine.sampling_params import SamplingParams

    llm = LLM(enable_prefix_caching=False)
    engine = llm.llm_engine
    runner = engine.executor.worker.runner
    rng = random.Random(seed)
    for i in range(batch):
        prompt = [rng.randrange(100, 49152) for _ in range(context)]
        engine.add_request(f"p{i}", {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0, max_tokens=steps * 3 + 16, ignore_eos=True))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first
    for _ in range(5):
        engine.step()
    timers = Timers()
    timers.wrap(engine.scheduler, "schedule", "scheduler")
    timers.wrap(engine.scheduler, "update_from_output", "scheduler")
    timers.wrap(engine.output_processor, "process", "detokenize / stop checks")
    timers.wrap(runner, "_prepare", "input preparation")
    timers.wrap(runner, "_forward", "model forward")
    timers.wrap(runner.model, "compute_logits", "LM head")
    timers.wrap(runner, "sampler", "sampling")
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    wall = (time.perf_counter() - start) / steps * 1e3
    parts = {k: v / steps * 1e3 for k, v in timers.totals.items()}
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(max(2, steps // 4)):
            engine.step()
    n_prof = max(2, steps // 4)
    ops = {"matmul": 0.0, "attention (gather, SDPA, KV write)": 0.0}
    for evt in prof.key_averages():
        if evt.key in MATMUL_OPS:
            ops["matmul"] += evt.self_cpu_time_total / 1e3 / n_prof
        elif evt.key in ATTENTION_OPS:
            ops["attention (gather, SDPA, KV write)"] += evt.self_cpu_time_total / 1e3 / n_prof
    print(f"\n== batch {batch}, context {context}: {wall:.1f} ms per decode step ({batch / wall * 1e3:.0f} tokens/s)")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:34s} {v:8.2f} ms  {v / wall:6.1%}")
    print(f"  {'engine Python outside these':34s} {wall - sum(parts.values()):8.2f} ms")
    print("  inside the model and LM head (torch profiler, which slows small ops):")
    for k, v in ops.items():
        print(f"    {k:32s} {v:8.2f} ms")
    llm.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    configs = [(args.batch, args.context)] if args.batch else [(1, 32), (64, 256)]
    for batch, context in configs:
        profile(batch, context, args.steps)


if __name__ == "__main__":
    main()
