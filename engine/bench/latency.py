"""``bench latency`` (vLLM's): the end-to-end time of one batch of ``--batch-size`` requests of
``--input-len`` prompt and ``--output-len`` output tokens, over ``--num-iters`` timed passes after
``--num-iters-warmup``; percentiles for the engine and for each peer that ran."""
from __future__ import annotations

import argparse
import gc
import statistics

from engine.bench import plots
from engine.bench.common import add_common_args, engine_settings, offline_peers, quiet, resolve_lengths, start_offline
from engine.bench.engine_run import run_engine
from engine.bench.peers import PeerResult
from engine.bench.report import Report

PERCENTILES = (10, 25, 50, 75, 90, 99)


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, input_len=32, output_len=128, num_prompts=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=5)


def percentiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    return {f"p{q}": s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))] for q in PERCENTILES} if s else {}


def run(ns: argparse.Namespace, report: Report) -> None:
    ns.num_prompts, ns.range_ratio = ns.batch_size, 0.0  # one batch of identical lengths
    resolve_lengths(ns, fixed=True)
    requests, model_dir, gguf, llm = start_offline(ns, report.machine)
    max_model_len = llm.llm_engine.config.model.max_model_len
    settings = engine_settings(llm)
    try:
        for _ in range(ns.num_iters_warmup):
            run_engine(llm, requests, "warm-up", desc="warm-up")
        quiet(ns)
        runs = [run_engine(llm, requests, settings, desc=f"iteration {i + 1}/{ns.num_iters}")
                for i in range(ns.num_iters)]
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    iters = [r.result.seconds for r in runs]
    engine = PeerResult("engine", f"{settings}, batch {ns.batch_size}", True, "", len(requests),
                        runs[0].result.output_tokens, statistics.fmean(iters),
                        max(r.result.other_cores or 0.0 for r in runs), iters)
    report.engine = {**engine.to_dict(), "avg_latency_s": engine.seconds, "percentiles_s": percentiles(iters)}
    report.peers.append(engine)
    for peer in offline_peers(ns, model_dir, gguf, max_model_len):
        report.peers.append(peer.measure(requests, repeat=ns.num_iters, settle=lambda: quiet(ns)))
    report.extra["latency_s"] = {p.name: {"avg": p.seconds, **percentiles(p.iteration_s)}
                                 for p in report.peers if p.ran}
    ran = [p for p in report.peers if p.ran]
    plots.peers_bar(report.path("peers"), {p.name: p.seconds for p in ran}, "seconds per batch (lower is better)",
                    f"Latency of a batch of {ns.batch_size}: {ns.input_len} in, {ns.output_len} out")
    last = runs[-1]
    report.extra["samples"] = {"ttft_s": last.ttft_s, "itl_s": last.itl_s}
    report.extra["timeline"] = vars(last.timeline)
    plots.latency_cdf(report.path("latency_cdf"), {"batch latency": {p.name: p.iteration_s for p in ran},
                                                   "TTFT": {"engine": last.ttft_s}, "ITL": {"engine": last.itl_s}})
    plots.timeline(report.path("timeline"), last.timeline.times, last.timeline.tokens_per_s, last.timeline.kv_usage,
                   f"Engine, last iteration (batch {ns.batch_size}): generation rate and KV-cache use")
    plots.throughput_vs_concurrency(report.path("throughput_vs_concurrency"),
                                    {"engine": last.timeline.rate_by_running()}, "generated tokens/s",
                                    "running requests")
