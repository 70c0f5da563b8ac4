"""Where the time of steady serving goes: steps that mix prefill chunks with decodes, against pure
decode steps, under Poisson arrivals at ``--request-rate`` requests/s (what a server sees; no HTTP:
requests are added to the engine when their arrival time has passed).

    python benchmarks/mixed_steps.py                                   # 1 request/s, 128 in / 64 out
    python benchmarks/mixed_steps.py --request-rate 1 2 --max-num-batched-tokens 2048 256 64

For each setting: every step's kind (pure decode of n rows, or mixed: d decodes + p prefill tokens),
its wall time, and the mean time per output token (TPOT) and time to first token (TTFT) of the
requests, measured in the engine itself (no HTTP). The table groups steps by kind so that a slow
mixed step shows up against the pure-decode step of the same decode rows.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field


@dataclass
class StepRecord:
    decodes: int
    prefill_tokens: int
    seconds: float


@dataclass
class RunResult:
    request_rate: float
    max_num_batched_tokens: int
    steps: list[StepRecord] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    seconds: float = 0.0
    output_tokens: int = 0

    def summary(self) -> dict:
        kinds: dict[str, list[float]] = defaultdict(list)
        for s in self.steps:
            kinds["decode" if s.prefill_tokens == 0 else "mixed"].append(s.seconds)
        mixed = [s for s in self.steps if s.prefill_tokens]
        return {
            "request_rate": self.request_rate, "max_num_batched_tokens": self.max_num_batched_tokens,
            "output_tokens_per_s": self.output_tokens / self.seconds,
            "mean_ttft_ms": 1e3 * statistics.mean(self.ttft_s), "mean_tpot_ms": 1e3 * statistics.mean(self.tpot_s),
            "steps": len(self.steps), "mixed_steps": len(mixed),
            "decode_step_ms": 1e3 * statistics.mean(kinds["decode"]) if kinds["decode"] else None,
            "mixed_step_ms": 1e3 * statistics.mean(kinds["mixed"]) if kinds["mixed"] else None,
            "mixed_prefill_tokens": statistics.mean(s.prefill_tokens for s in mixed) if mixed else 0,
            "share_of_time_in_mixed": sum(kinds["mixed"]) / max(1e-9, sum(kinds["mixed"]) + sum(kinds["decode"])),
        }


def run(llm, request_rate: float, num_requests: int, input_len: int, output_len: int, seed: int,
        budget: int) -> RunResult:
    from engine import SamplingParams

    engine = llm.llm_engine
    engine.scheduler.config.max_num_batched_tokens = budget  # read per step by the scheduler
    rng = random.Random(seed)
    vocab = engine.tokenizer.vocab_size
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(input_len)] for _ in range(num_requests)]
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    res = RunResult(request_rate, budget)
    arrivals, t_arr = [], 0.0
    for _ in range(num_requests):
        arrivals.append(t_arr)
        t_arr += rng.expovariate(request_rate) if request_rate != float("inf") else 0.0
    schedule = engine.scheduler.schedule
    last = {}

    def traced():
        so = schedule()
        last["so"] = so
        return so

    engine.scheduler.schedule = traced
    started: dict[str, float] = {}
    first: dict[str, float] = {}
    nxt = 0
    t0 = time.perf_counter()
    try:
        while nxt < num_requests or engine.has_unfinished_requests():
            while nxt < num_requests and time.perf_counter() - t0 >= arrivals[nxt]:
                rid = f"r{nxt}"
                engine.add_request(rid, {"prompt_token_ids": prompts[nxt]}, params)
                started[rid] = time.perf_counter()
                nxt += 1
            if not engine.has_unfinished_requests():  # idle until the next arrival
                time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
                continue
            t = time.perf_counter()
            outs = engine.step()
            now = time.perf_counter()
            so = last["so"]
            decodes = sum(1 for c, s in zip(so.num_scheduled_tokens, so.sample) if c == 1 and s)
            res.steps.append(StepRecord(decodes, so.total_num_scheduled_tokens - decodes, now - t))
            for out in outs:
                n = len(out.outputs[0].token_ids)
                if n and out.request_id not in first:
                    first[out.request_id] = now
                if out.finished:
                    res.output_tokens += n
                    res.ttft_s.append(first[out.request_id] - started[out.request_id])
                    res.tpot_s.append((now - first[out.request_id]) / max(1, n - 1))
    finally:
        engine.scheduler.schedule = schedule
    res.seconds = time.perf_counter() - t0
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--request-rate", type=float, nargs="+", default=[1.0])
    ap.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[2048])
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ns = ap.parse_args()

    from engine import LLM

    llm = LLM(ns.model, max_num_batched_tokens=max(ns.max_num_batched_tokens), enable_prefix_caching=False)
    run(llm, float("inf"), 4, ns.input_len, 8, ns.seed + 1, max(ns.max_num_batched_tokens))  # warm-up: plans recorded
    rows = []
    for c in ns.request_rate:
        for b in ns.max_num_batched_tokens:
            s = run(llm, c, ns.num_prompts, ns.input_len, ns.output_len, ns.seed, b).summary()
            rows.append(s)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in s.items()}), flush=True)
    llm.shutdown()
    print("\n| request rate | budget | out tok/s | TTFT ms | TPOT ms | decode step ms | mixed step ms "
          "(prefill tok) | time in mixed |")
    print("|---|---|---|---|---|---|---|---|")
    for s in rows:
        print(f"| {s['request_rate']} | {s['max_num_batched_tokens']} | {s['output_tokens_per_s']:.1f} | "
              f"{s['mean_ttft_ms']:.0f} | {s['mean_tpot_ms']:.1f} | {s['decode_step_ms'] or 0:.1f} | "
              f"{s['mixed_step_ms'] or 0:.1f} ({s['mixed_prefill_tokens']:.0f}) | {100 * s['share_of_time_in_mixed']:.0f}% |")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
