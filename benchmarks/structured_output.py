"""Structured outputs: what a JSON-schema constraint costs per token, at first token and to compile.

This is ``python -m engine bench structured`` (engine/bench/structured.py) under the flags this
script always had:

    python benchmarks/structured_output.py                 # 64 requests, the default model (~10 min on 2 cores)
    python benchmarks/structured_output.py --requests 16 --json out.json

Equivalent: ``python -m engine bench structured --dataset-name random-ids --num-prompts 64
--batch1-requests 3 --max-model-len 1024 --no-enable-prefix-caching --peers none``. In one run, on
the seeded workload of benchmarks/throughput.py (random prompts of 16..512 tokens, outputs of
16..256 tokens): all requests at once unconstrained vs every request under a JSON schema (an
integer array whose ``minItems`` keeps it open, so both generate the same tokens), the per-token
overhead and the seconds inside structured-output code; the same one request at a time; time to
first token unconstrained vs with a cached grammar; the first compile of a 30-field object schema.
It prints docs/structured_outputs.md's table. Any other ``bench structured`` flag passes through.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.bench.structured import LONG_ARRAY, Attributed, thirty_fields  # noqa: F401  (re-exported)


def bench_argv(argv: list[str] | None = None) -> tuple[list[str], argparse.Namespace]:
    """The ``python -m engine`` argv this script's flags stand for, and the parsed flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch1-requests", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--result-dir", default="bench-results")
    ap.add_argument("--json", default=None, help="write the figures here")
    args, rest = ap.parse_known_args(argv)
    out = ["bench", "structured", "--dataset-name", "random-ids", "--num-prompts", str(args.requests),
           "--batch1-requests", str(args.batch1_requests), "--seed", str(args.seed), "--max-model-len", "1024",
           "--no-enable-prefix-caching", "--peers", "none", "--result-dir", args.result_dir]
    if args.model is not None:
        out += ["--model", args.model]
    return out + rest, args


def main(argv: list[str] | None = None) -> int:
    from engine.entrypoints.cli import main as engine_main

    cmd, args = bench_argv(argv)
    print("python -m engine " + " ".join(cmd))
    rc = engine_main(cmd)
    if args.json:
        engine = json.loads((Path(args.result_dir) / "structured.json").read_text())["engine"]
        figures = {k: v for k, v in engine.items() if k.startswith(("first_compile", "concurrent", "batch1", "ttft"))}
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return rc


if __name__ == "__main__":
    sys.exit(main())
