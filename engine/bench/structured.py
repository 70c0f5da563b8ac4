"""``bench structured``: the same workload unconstrained and with every request under a JSON schema
(an integer array whose ``minItems`` keeps it open, so each request still generates exactly its
output length): output tokens/s for both and the per-token overhead of the constraint."""
from __future__ import annotations

import argparse
import gc

from engine.bench import plots
from engine.bench.common import add_common_args, dataset_from, engine_kwargs, quiet
from engine.bench.engine_run import greedy, run_engine
from engine.bench.peers import PeerResult
from engine.bench.report import Report, machine_info

LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)


def run(ns: argparse.Namespace, report: Report) -> None:
    from engine.entrypoints.llm import LLM
    from engine.structured_output.params import StructuredOutputsParams

    requests = dataset_from(ns)
    report.machine = machine_info(quiet(ns))
    so = StructuredOutputsParams(json=LONG_ARRAY, disable_any_whitespace=True)
    constrained = [greedy(r, structured_outputs=so) for r in requests]
    llm = LLM(ns.model, **engine_kwargs(ns))
    try:
        run_engine(llm, requests[:2], "warm-up", params=constrained[:2], desc="warm-up (compiles the grammar)")
        quiet(ns)
        free = run_engine(llm, requests, "unconstrained", desc="unconstrained")
        quiet(ns)
        json_run = run_engine(llm, requests, "JSON schema (xgrammar)", params=constrained, desc="JSON schema")
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    free.result.name, json_run.result.name = "engine (unconstrained)", "engine (JSON schema)"
    report.peers += [free.result, json_run.result]
    overhead = free.result.tokens_per_s / json_run.result.tokens_per_s - 1 if json_run.result.tokens_per_s else None
    report.engine = {**json_run.result.to_dict(), "per_token_overhead": overhead}
    if ns.peers not in ("none", ""):
        report.peers.append(PeerResult("vLLM CPU (structured)", "", ran=False,
                                       reason="bench structured compares the engine with itself; "
                                              "peers run in bench throughput / serve"))
    report.extra["samples"] = {"ttft_s_unconstrained": free.ttft_s, "ttft_s_json": json_run.ttft_s,
                               "itl_s_unconstrained": free.itl_s, "itl_s_json": json_run.itl_s}
    report.extra["timeline"] = vars(json_run.timeline)
    plots.peers_bar(report.path("peers"), {p.name: p.tokens_per_s for p in report.peers if p.ran},
                    "output tokens/s", f"JSON-schema constraint on {len(requests)} requests")
    plots.latency_cdf(report.path("latency_cdf"),
                      {"TTFT": {"free": free.ttft_s, "JSON": json_run.ttft_s},
                       "ITL": {"free": free.itl_s, "JSON": json_run.itl_s}})
    plots.timeline(report.path("timeline"), json_run.timeline.times, json_run.timeline.tokens_per_s,
                   json_run.timeline.kv_usage, "Engine under a JSON schema: generation rate and KV-cache use")
