"""Serving benchmark against a server that is already running (``python -m engine bench serve``
starts one, sweeps concurrency, runs the peers and draws the plots; this is its client alone).

    python -m engine serve --port 8000 &
    python benchmarks/serving.py --base-url http://127.0.0.1:8000 --num-prompts 64 --request-rate 4
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys

from engine.bench.datasets import DatasetArgs, make_dataset
from engine.bench.serve_client import ClientArgs, benchmark, print_summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root (without /v1)")
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--model", default=None, help="model name (default: the first of /v1/models)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="requests/s, Poisson; inf: all at once")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--input-len", type=int, default=128, help="mean prompt length in words (about tokens)")
    p.add_argument("--output-len", type=int, default=64, help="mean output length in tokens")
    p.add_argument("--range-ratio", type=float, default=0.5, help="lengths are uniform in mean*(1 +- ratio)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds without data before a request fails")
    p.add_argument("--result-json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    args.base_url = args.base_url.rstrip("/")
    if args.num_prompts < 1 or args.request_rate <= 0 or not 0 <= args.range_ratio < 1:
        p.error("need --num-prompts >= 1, --request-rate > 0 and 0 <= --range-ratio < 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    requests = make_dataset(DatasetArgs("random", args.num_prompts, args.input_len, args.output_len,
                                        args.range_ratio, seed=args.seed))
    client = ClientArgs(args.base_url, args.model, args.api_key, args.endpoint, args.request_rate,
                        args.max_concurrency, args.temperature, args.seed, args.timeout)
    summary = asyncio.run(benchmark(client, requests))
    print_summary(summary)
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({**summary, "args": {k: v for k, v in vars(args).items() if k != "api_key"}}, f, indent=2)
    return 0 if summary["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
