"""``bench prefix``: the prefix-repetition workload (``--num-prefixes`` shared prefixes of
``--prefix-len`` words, each followed by a unique question) with the prefix cache on and off."""
from __future__ import annotations

import argparse
import gc

from engine.bench import plots
from engine.bench.common import add_common_args, dataset_from, engine_kwargs, model_paths, offline_peers, quiet
from engine.bench.engine_run import run_engine
from engine.bench.report import Report, machine_info


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, input_len=32, output_len=32, dataset="prefix-repetition")


def run(ns: argparse.Namespace, report: Report) -> None:
    from engine.entrypoints.llm import LLM

    requests = dataset_from(ns)
    model_dir, gguf = model_paths(ns)
    report.machine = machine_info(quiet(ns))
    runs = {}
    max_model_len = 2048
    for caching in (True, False):
        kwargs = {**engine_kwargs(ns), "enable_prefix_caching": caching}
        llm = LLM(ns.model, **kwargs)
        max_model_len = llm.llm_engine.config.model.max_model_len
        try:
            run_engine(llm, requests[:1], "warm-up", desc="warm-up")
            llm.llm_engine.kv_cache.reset_prefix_cache()
            name = f"prefix cache {'on' if caching else 'off'}"
            quiet(ns)
            runs[caching] = run_engine(llm, requests, name, desc=name)
        finally:
            llm.shutdown()
            del llm
            gc.collect()
    for caching, res in runs.items():
        res.result.name = f"engine (prefix cache {'on' if caching else 'off'})"
        report.peers.append(res.result)
    on, off = runs[True], runs[False]
    report.engine = {**on.result.to_dict(), "prefix_cache_hit_rate": on.prefix_cache_hit_rate,
                     "speedup_vs_no_cache": on.result.tokens_per_s / off.result.tokens_per_s
                     if off.result.tokens_per_s else None}
    for peer in offline_peers(ns, model_dir, gguf, max_model_len):
        quiet(ns)
        report.peers.append(peer.measure(requests))
    report.extra["samples"] = {"ttft_s_cache_on": on.ttft_s, "ttft_s_cache_off": off.ttft_s}
    report.extra["timeline"] = vars(on.timeline)
    plots.peers_bar(report.path("peers"), {p.name: p.tokens_per_s for p in report.peers if p.ran},
                    "output tokens/s", f"{ns.num_prefixes} shared prefixes of {ns.prefix_len} words")
    plots.latency_cdf(report.path("latency_cdf"), {"TTFT": {"cache on": on.ttft_s, "cache off": off.ttft_s}})
    plots.timeline(report.path("timeline"), on.timeline.times, on.timeline.tokens_per_s, on.timeline.kv_usage,
                   "Engine with the prefix cache: generation rate and KV-cache use")
