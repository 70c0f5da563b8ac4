"""Prefix-caching benchmark: many requests sharing a long system prompt, caching on vs off.

This is ``python -m engine bench prefix`` (engine/bench/prefix.py) with one shared prefix, under
the flags this script always had:

    python benchmarks/prefix_cache.py                     # 32 requests, 1,000-word shared prefix
    python benchmarks/prefix_cache.py --num-requests 8 --prefix-len 200 --max-tokens 8   # quick

Equivalent: ``python -m engine bench prefix --num-prompts 32 --num-prefixes 1 --prefix-len 1000
--input-len 12 --output-len 16 --range-ratio 0 --peers none``. All requests are submitted at once
and the engine is stepped until they finish, on an engine with prefix caching and on one without.
Reported per run: time to first token (mean / p50 / max over requests, from submission), total
time, prompt tokens actually computed, the hit rate (hit tokens / prompt tokens) and steps; then
the speed-ups and whether the greedy outputs of both runs are equal. The prefix is common English
words (about one token each). Any other ``bench prefix`` flag passes through.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def bench_argv(argv: list[str] | None = None) -> tuple[list[str], argparse.Namespace]:
    """The ``python -m engine`` argv this script's flags stand for, and the parsed flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--prefix-len", type=int, default=1000, help="words (about tokens) of the shared system prompt")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--result-dir", default="bench-results")
    args, rest = ap.parse_known_args(argv)
    out = ["bench", "prefix", "--num-prompts", str(args.num_requests), "--num-prefixes", "1",
           "--prefix-len", str(args.prefix_len), "--input-len", "12", "--output-len", str(args.max_tokens),
           "--range-ratio", "0", "--block-size", str(args.block_size),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--peers", "none",
           "--result-dir", args.result_dir]
    if args.model is not None:
        out += ["--model", args.model]
    return out + rest, args


def main(argv: list[str] | None = None) -> int:
    from engine.entrypoints.cli import main as engine_main

    cmd, args = bench_argv(argv)
    print("python -m engine " + " ".join(cmd))
    rc = engine_main(cmd)
    e = json.loads((Path(args.result_dir) / "prefix.json").read_text())["engine"]
    # the summary this script always printed
    print(json.dumps({"config": vars(args), "off": e["off"], "on": e["on"], "speedup_total": e["speedup_total"],
                      "speedup_ttft_mean": e["speedup_ttft_mean"],
                      "greedy_outputs_equal": e["greedy_outputs_equal"]}, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
