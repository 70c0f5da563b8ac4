"""``bench throughput``: the workload offline through the engine, then through each peer, one after
the other (never two at once); useful output tokens/s for each, the engine's timeline and latencies."""
from __future__ import annotations

import argparse
import gc

from engine.bench import plots
from engine.bench.common import add_common_args, offline_peers, quiet, start_offline
from engine.bench.engine_run import run_engine
from engine.bench.report import Report


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)


def run(ns: argparse.Namespace, report: Report) -> None:
    requests, model_dir, gguf, llm = start_offline(ns, report.machine)
    max_model_len = llm.llm_engine.config.model.max_model_len
    try:
        run_engine(llm, requests[:2], "warm-up", desc="warm-up")
        res = run_engine(llm, requests, "fp32" if ns.quantization is None else ns.quantization)
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    report.engine = {**res.result.to_dict(), "prefix_cache_hit_rate": res.prefix_cache_hit_rate}
    report.peers.append(res.result)
    for peer in offline_peers(ns, model_dir, gguf, max_model_len):
        quiet(ns)
        report.peers.append(peer.measure(requests))
        gc.collect()
    report.extra["timeline"] = vars(res.timeline)
    report.extra["samples"] = {"ttft_s": res.ttft_s, "itl_s": res.itl_s}
    ran = {p.name: p.tokens_per_s for p in report.peers if p.ran}
    plots.peers_bar(report.path("peers"), ran, "useful output tokens/s",
                    f"Offline throughput, {len(requests)} requests ({ns.dataset_name})")
    plots.timeline(report.path("timeline"), res.timeline.times, res.timeline.tokens_per_s, res.timeline.kv_usage,
                   "Engine: generation rate and KV-cache use")
    plots.latency_cdf(report.path("latency_cdf"), {"TTFT": {"engine": res.ttft_s}, "ITL": {"engine": res.itl_s}})
