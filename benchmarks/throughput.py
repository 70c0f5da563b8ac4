"""Offline throughput: the engine against transformers (and vLLM's CPU build), measured in one run.

This is ``python -m engine bench throughput`` (engine/bench/throughput.py) under the flags this
script always had; the workload, the runs, the ceilings and the report live there.

    python benchmarks/throughput.py                                  # 64 requests, both transformers baselines
    python benchmarks/throughput.py --baselines none                 # the engine only
    python benchmarks/throughput.py --baseline-requests 16           # baselines on the first 16 requests
    python benchmarks/throughput.py --vllm-python ~/vllm-venv/bin/python   # and vLLM's CPU build
    python benchmarks/throughput.py --quantization int8 --baselines none
    python benchmarks/throughput.py --tensor-parallel-size 2 --baselines none

Equivalent: ``python -m engine bench throughput --dataset-name random-ids --num-prompts 64
--dtype float32 --no-enable-prefix-caching --peers transformers``. The workload: N seeded requests
of random token ids, prompts of 16..512 tokens, outputs of 16..256, ignore_eos. Reported: useful
output tokens/s for each system and how many times faster the engine is; for the engine, processed
tokens/s (prompt + output) as a fraction of the fp32 compute ceiling and single-request decode as a
fraction of the bandwidth floor, the ceilings measured in this run before and after the engine
(the higher of each); single-request decode is the fastest of three runs before the workload and
three after (vLLM's too, in its own process). Any other ``bench throughput`` flag passes through
(``--result-dir``, ``--ceilings``, ``--wait-quiet-s``, ...).

Other benchmarks import the workload and runners from here: ``make_workload``, ``Workload``,
``run_engine`` (seconds of ``LLM.generate`` on a workload) and ``engine_decode_step_s``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.bench.datasets import Workload, make_workload  # noqa: F401  (re-exported)
from engine.bench.engine_run import decode_step_s as engine_decode_step_s  # noqa: F401
from engine.bench.engine_run import generate_workload as run_engine  # noqa: F401

BASELINES = {"all": ["transformers"], "static": ["transformers-static"], "sequential": ["transformers-sequential"],
             "none": []}


def bench_argv(argv: list[str] | None = None) -> tuple[list[str], argparse.Namespace]:
    """The ``python -m engine`` argv this script's flags stand for, and the parsed flags."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model directory (default: the embedded SmolLM2)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantization", default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--baselines", default="all", choices=list(BASELINES))
    p.add_argument("--baseline-requests", type=int, default=None, help="requests for the baselines (default: all)")
    p.add_argument("--vllm-python", default=None, help="also run vLLM's CPU build from this virtualenv's python")
    p.add_argument("--result-dir", default="bench-results")
    p.add_argument("--json", default=None, help="also write the result JSON to this file")
    args, rest = p.parse_known_args(argv)
    peers = BASELINES[args.baselines] + (["vllm"] if args.vllm_python else [])
    out = ["bench", "throughput", "--dataset-name", "random-ids", "--num-prompts", str(args.num_requests),
           "--seed", str(args.seed), "--dtype", args.dtype, "--tensor-parallel-size", str(args.tensor_parallel_size),
           "--max-num-seqs", str(args.max_num_seqs), "--no-enable-prefix-caching",
           "--peers", ",".join(peers) or "none", "--result-dir", args.result_dir]
    for flag, value in (("--model", args.model), ("--quantization", args.quantization),
                        ("--max-num-batched-tokens", args.max_num_batched_tokens),
                        ("--baseline-requests", args.baseline_requests), ("--vllm-python", args.vllm_python)):
        if value is not None:
            out += [flag, str(value)]
    return out + rest, args


def main(argv: list[str] | None = None) -> int:
    from engine.entrypoints.cli import main as engine_main

    cmd, args = bench_argv(argv)
    print("python -m engine " + " ".join(cmd))
    rc = engine_main(cmd)
    if args.json:
        result = json.loads((Path(args.result_dir) / "throughput.json").read_text())
        Path(args.json).write_text(json.dumps(summary(result, args), indent=2))
    return rc


ENGINE_KEYS = ("seconds", "processed_tok_s", "fraction_of_fp32_compute_ceiling", "single_request_decode_ms",
               "decode_floor_ms", "fraction_of_bandwidth_floor")
PEER_KEYS = {"transformers (static)": "hf_static", "transformers (sequential)": "hf_sequential", "vLLM CPU": "vllm"}


def summary(result: dict, args: argparse.Namespace) -> dict:
    """The --json file in the shape this script always wrote (benchmarks/ab_compare.py compares
    checkouts by these keys), from bench throughput's result."""
    e = result["engine"]
    out = {"args": vars(args), "engine": {"useful_tok_s": e["output_tokens_per_s"],
                                          **{k: e[k] for k in ENGINE_KEYS if k in e}},
           "ceilings": (result.get("ceilings") or {}).get("best")}
    for p in result["peers"]:
        if p["name"] in PEER_KEYS and p["ran"]:
            out[PEER_KEYS[p["name"]]] = {"requests": p["requests"], "seconds": p["seconds"],
                                         "useful_tok_s": p["output_tokens_per_s"], "engine_is": p["engine_is"]}
    return out


if __name__ == "__main__":
    sys.exit(main())
