"""Prefix-caching benchmark: many requests sharing a long system prompt, caching off vs on.

    python benchmarks/prefix_cache.py                     # 32 requests, 1,000-token system prompt
    python benchmarks/prefix_cache.py --num-requests 8 --prefix-len 200 --max-tokens 8   # quick

All requests are submitted at once and the engine is stepped until they finish. Reported per run:
time to first token (mean / p50 / max over requests, from submission), total time, prefill tokens
actually computed, and the prefix-cache hit rate (hit tokens / prompt tokens). Both runs happen in
this process on the same prompts, so the comparison is fair on a noisy machine. Greedy outputs of the
two runs are compared too.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

from engine.entrypoints.llm import LLM
from engine.sampling_params import SamplingParams

_TEXT = (
    "You are the support assistant of a public library. The library opens at nine in the morning and "
    "closes at six in the evening from Monday to Saturday; it is closed on Sundays and public holidays. "
    "Members may borrow up to five books at a time for three weeks, renew each loan twice online, and "
    "reserve books that are on loan. Late returns cost ten cents per book per day. The reading room on "
    "the second floor is silent; group study rooms on the third floor can be booked for two hours. "
    "Children's events take place on Wednesday afternoons. Printing costs five cents per page. "
)
QUESTIONS = [
    "When does the library open?", "How many books can I borrow?", "Is it open on Sunday?",
    "How much is a late fee?", "Where is the reading room?", "Can I book a study room?",
    "When are children's events?", "How much does printing cost?", "Can I renew a loan?",
    "How long is a loan?", "Can I reserve a book?", "Is the reading room quiet?",
    "How long can I book a room?", "Which floor has study rooms?", "Do you open on holidays?",
    "When do you close on Saturday?",
]


def build_prompts(tokenizer, num_requests: int, prefix_len: int) -> list[list[int]]:
    ids: list[int] = []
    while len(ids) < prefix_len:
        ids += tokenizer.encode(_TEXT)
    prefix = ids[:prefix_len]
    out = []
    for i in range(num_requests):
        q = QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (asked by reader {i})")
        out.append(prefix + tokenizer.encode(f"\nQuestion: {q}\nAnswer:"))
    return out


def run(args: argparse.Namespace, caching: bool, prompts: list[list[int]] | None) -> dict:
    num_blocks = args.num_requests * (args.prefix_len + 64 + args.max_tokens) // args.block_size + 16
    llm = LLM(args.model, enable_prefix_caching=caching, block_size=args.block_size,
              num_gpu_blocks_override=num_blocks, max_num_batched_tokens=args.max_num_batched_tokens)
    engine = llm.llm_engine
    if prompts is None:
        prompts = build_prompts(llm.get_tokenizer(), args.num_requests, args.prefix_len)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    # warm-up outside the timed region (first-call allocations)
    llm.generate({"prompt_token_ids": prompts[0][-32:]}, SamplingParams(max_tokens=2), use_tqdm=False)
    engine.kv_cache.reset_prefix_cache()
    base = llm.get_stats()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", {"prompt_token_ids": p}, params)
    ttft: dict[str, float] = {}
    outputs: dict[str, list[int]] = {}
    for _ in range(100_000):
        if not engine.has_unfinished_requests():
            break
        for out in engine.step():
            now = time.perf_counter() - start
            if out.request_id not in ttft and out.outputs[0].token_ids:
                ttft[out.request_id] = now
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
    total = time.perf_counter() - start
    st = llm.get_stats()
    queries = st["prefix_cache_queries"] - base["prefix_cache_queries"]
    hits = st["prefix_cache_hits"] - base["prefix_cache_hits"]
    t = sorted(ttft.values())
    result = {
        "prefix_caching": caching,
        "ttft_mean_s": round(statistics.mean(t), 3),
        "ttft_p50_s": round(t[len(t) // 2], 3),
        "ttft_max_s": round(t[-1], 3),
        "total_s": round(total, 3),
        "prompt_tokens": sum(map(len, prompts)),
        "prefill_tokens_computed": st["scheduler_num_prefill_tokens"] - base["scheduler_num_prefill_tokens"],
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "steps": st["scheduler_num_steps"] - base["scheduler_num_steps"],
    }
    llm.shutdown()
    del llm, engine
    gc.collect()
    return {"result": result, "prompts": prompts, "outputs": [outputs[f"b{i}"] for i in range(len(prompts))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=1000, help="tokens of the shared system prompt")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = ap.parse_args()
    off = run(args, caching=False, prompts=None)
    on = run(args, caching=True, prompts=off["prompts"])
    report = {
        "config": vars(args),
        "off": off["result"],
        "on": on["result"],
        "speedup_total": round(off["result"]["total_s"] / on["result"]["total_s"], 2),
        "speedup_ttft_mean": round(off["result"]["ttft_mean_s"] / on["result"]["ttft_mean_s"], 2),
        "greedy_outputs_equal": off["outputs"] == on["outputs"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
