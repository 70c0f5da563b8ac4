"""``bench prefix``: the prefix-repetition workload (``--num-prefixes`` shared prefixes of
``--prefix-len`` words, each followed by a unique question), all requests at once, on two engines
one after the other: prefix cache on and off. For each: time to first token (mean, p50, max, from
submission), total time, prompt tokens actually computed, the hit rate and steps; then the
speed-ups and whether the greedy outputs of both runs are identical (the cache must not change a
token). ``benchmarks/prefix_cache.py`` is this with its old flags (one 1,000-token prefix)."""
from __future__ import annotations

import argparse
import gc
import statistics

from engine.bench import plots
from engine.bench.common import (add_common_args, dataset_from, engine_kwargs, engine_settings, model_paths,
                                 offline_peers, quiet)
from engine.bench.engine_run import EngineRun, run_engine
from engine.bench.report import Report, machine_info

MODES = {True: "on", False: "off"}


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, input_len=32, output_len=32, dataset="prefix-repetition")


def summary(res: EngineRun) -> dict:
    t = sorted(res.ttft_s)
    return {"ttft_mean_s": statistics.fmean(t) if t else None, "ttft_p50_s": t[len(t) // 2] if t else None,
            "ttft_max_s": t[-1] if t else None, "total_s": res.result.seconds, "prompt_tokens": res.prompt_tokens,
            "prefill_tokens_computed": res.prefill_tokens, "hit_rate": res.prefix_cache_hit_rate or 0.0,
            "steps": res.steps}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def run(ns: argparse.Namespace, report: Report) -> None:
    from engine.entrypoints.llm import LLM

    model_dir, gguf = model_paths(ns)
    requests = dataset_from(ns, model_dir)
    report.machine = machine_info(quiet(ns))
    runs: dict[bool, EngineRun] = {}
    max_model_len = 2048
    for caching in (True, False):
        llm = LLM(ns.model, **{**engine_kwargs(ns), "enable_prefix_caching": caching})
        max_model_len = llm.llm_engine.config.model.max_model_len
        settings = engine_settings(llm)
        try:
            run_engine(llm, requests[:1], "warm-up", desc="warm-up")
            llm.llm_engine.kv_cache.reset_prefix_cache()
            quiet(ns)
            runs[caching] = run_engine(llm, requests, settings, desc=f"prefix cache {MODES[caching]}")
        finally:
            llm.shutdown()
            del llm
            gc.collect()
    for caching, res in runs.items():
        res.result.name = f"engine (prefix cache {MODES[caching]})"
        report.peers.append(res.result)
    on, off = runs[True], runs[False]
    s_on, s_off = summary(on), summary(off)
    report.engine = {**on.result.to_dict(), "prefix_cache_hit_rate": on.prefix_cache_hit_rate,
                     "speedup_vs_no_cache": _ratio(on.result.tokens_per_s, off.result.tokens_per_s),
                     "speedup_total": _ratio(off.result.seconds, on.result.seconds),
                     "speedup_ttft_mean": _ratio(s_off["ttft_mean_s"], s_on["ttft_mean_s"]),
                     "greedy_outputs_equal": on.outputs == off.outputs, "on": s_on, "off": s_off}
    for name, s in (("on", s_on), ("off", s_off)):
        report.notes.append(f"prefix cache {name}: TTFT mean {s['ttft_mean_s']:.3f} s, p50 {s['ttft_p50_s']:.3f} s, "
                            f"max {s['ttft_max_s']:.3f} s; total {s['total_s']:.2f} s; "
                            f"{s['prefill_tokens_computed']} of {s['prompt_tokens']} prompt tokens computed; "
                            f"hit rate {s['hit_rate']:.1%}; {s['steps']} steps")
    e = report.engine
    same = "identical" if e["greedy_outputs_equal"] else "DIFFER"
    report.notes.append(f"cache on is {e['speedup_total'] or 0:.2f}x faster in total and "
                        f"{e['speedup_ttft_mean'] or 0:.2f}x in mean TTFT; greedy outputs {same}")
    for peer in offline_peers(ns, model_dir, gguf, max_model_len):
        report.peers.append(peer.measure(requests, settle=lambda: quiet(ns)))
    report.extra["samples"] = {"ttft_s_cache_on": on.ttft_s, "ttft_s_cache_off": off.ttft_s,
                               "itl_s_cache_on": on.itl_s, "itl_s_cache_off": off.itl_s}
    report.extra["timeline"] = vars(on.timeline)
    plots.peers_bar(report.path("peers"), {p.name: p.tokens_per_s for p in report.peers if p.ran},
                    "output tokens/s", f"{ns.num_prefixes} shared prefixes of {ns.prefix_len} words")
    plots.latency_cdf(report.path("latency_cdf"), {"TTFT": {"cache on": on.ttft_s, "cache off": off.ttft_s},
                                                   "ITL": {"cache on": on.itl_s, "cache off": off.itl_s}})
    plots.timeline(report.path("timeline"), on.timeline.times, on.timeline.tokens_per_s, on.timeline.kv_usage,
                   "Engine with the prefix cache: generation rate and KV-cache use")
    plots.throughput_vs_concurrency(report.path("throughput_vs_concurrency"),
                                    {f"cache {MODES[c]}": r.timeline.rate_by_running() for c, r in runs.items()},
                                    "generated tokens/s", "running requests")
