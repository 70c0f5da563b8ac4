"""Per-step cost of the Ray executor against the in-process one (docs/ray.md has the figures).

Runs decode steps at a fixed batch through three executors and reports the median step time:
  uni      TP=1 in this process
  ray-tp1  TP=1 in one Ray actor (the Ray dispatch cost alone: put, remote call, wait, get)
  ray-tp2  TP=2 in two Ray actors (plus two gloo all-reduces per layer and a logits all-gather)

  python benchmarks/ray_overhead.py [--model PATH] [--batch 1 8] [--steps 40] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def step_times(llm, batch: int, steps: int) -> list[float]:
    from engine.sampling_params import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 4, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", f"Request {i}: tell me about paging.", params)
    while any(r.num_computed_tokens < len(r.prompt_token_ids) for r in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()  # prefill
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    while engine.has_unfinished_requests():
        engine.step()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the in-process executor (each Ray CPU rank uses 1)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    from engine import LLM

    configs = [
        ("uni", dict(tensor_parallel_size=1)),
        ("ray-tp1", dict(tensor_parallel_size=1, distributed_executor_backend="ray")),
        ("ray-tp2", dict(tensor_parallel_size=2)),
    ]
    results: dict[tuple[str, int], float] = {}
    for name, kw in configs:
        llm = LLM(args.model, num_gpu_blocks_override=256, enable_prefix_caching=False, max_model_len=1024, **kw)
        try:
            step_times(llm, 1, 5)  # warm-up
            for b in args.batch:
                results[name, b] = statistics.median(step_times(llm, b, args.steps)) * 1e3
        finally:
            llm.shutdown()
    print(f"{'executor':10s} " + " ".join(f"{'batch ' + str(b):>12s}" for b in args.batch) + "   (median ms per decode step)")
    for name, _ in configs:
        print(f"{name:10s} " + " ".join(f"{results[name, b]:12.1f}" for b in args.batch))
    for b in args.batch:
        print(f"batch {b}: Ray dispatch +{results['ray-tp1', b] - results['uni', b]:.1f} ms/step, "
              f"TP=2 vs in-process {results['ray-tp2', b] - results['uni', b]:+.1f} ms/step")


if __name__ == "__main__":
    main()
