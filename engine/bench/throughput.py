"""``bench throughput``: the workload offline through the engine, then through each peer, one after
the other (never two at once): useful output tokens/s for each and how many times faster the
engine is. Around the engine, in the same run: the machine's ceilings (read bandwidth, fp32 matmul
rate) before and after it, and single-request decode before and after the workload (the best of
each counts: the machine is shared), so the engine's figures are also reported as fractions of the
fp32 compute ceiling and of the bandwidth floor. vLLM's CPU build, given ``--vllm-python``, runs
the same workload and the same single-request decode. The default workload (``random-ids``, 64
requests, seed 0) is the one docs/performance.md's table was measured on."""
from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Any

from engine.bench import plots
from engine.bench.ceilings import SIZES, Ceilings, measure, model_costs
from engine.bench.common import (add_common_args, dataset_from, decode_request, engine_kwargs, engine_settings,
                                 model_paths, offline_peers, quiet)
from engine.bench.engine_run import EngineRun, decode_step_s, run_engine
from engine.bench.peers import DecodeJob
from engine.bench.report import Report, machine_info


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, dataset="random-ids")
    g = p.add_argument_group("throughput")
    g.add_argument("--baseline-requests", type=int, default=None,
                   help="the peers run only the first N requests (compared as rates; default: all)")
    g.add_argument("--ceilings", default="full", choices=[*SIZES, "none"],
                   help="measure the machine's ceilings before and after the engine (none: skip)")
    g.add_argument("--decode-tokens", type=int, default=128, help="tokens of the single-request decode run")
    g.add_argument("--decode-repeats", type=int, default=3,
                   help="single-request decode runs before and after the workload (0: none)")


def _ceilings(ns: argparse.Namespace, report: Report, when: str) -> Ceilings | None:
    if ns.ceilings == "none":
        return None
    with report.timed(f"ceilings {when}"):
        return measure(wait_quiet_s=max(ns.wait_quiet_s, 0.0), size=ns.ceilings)


def _decode(ns: argparse.Namespace, report: Report, llm: Any, prompt: Any, when: str) -> list[float]:
    if ns.decode_repeats <= 0:
        return []
    quiet(ns)
    with report.timed(f"single-request decode {when}"):
        return [decode_step_s(llm, prompt, ns.decode_tokens) for _ in range(ns.decode_repeats)]


def run(ns: argparse.Namespace, report: Report) -> None:
    from engine.entrypoints.llm import LLM
    from engine.models.hf_config import load_hf_config

    if ns.decode_repeats > 0 and ns.decode_tokens < 2:
        raise SystemExit("--decode-tokens must be >= 2")
    model_dir, gguf = model_paths(ns)
    requests = dataset_from(ns, model_dir)
    unit = "tokens" if requests[0].prompt_token_ids else "words"
    workload = (f"workload: {len(requests)} requests ({ns.dataset_name}, seed {ns.seed}), "
                f"{sum(r.input_words for r in requests)} prompt {unit}, "
                f"{sum(r.output_len for r in requests)} output tokens")
    print(workload)
    report.notes.append(workload)
    report.machine = machine_info(quiet(ns))
    before = _ceilings(ns, report, "before")
    llm = LLM(ns.model, **engine_kwargs(ns))
    max_model_len = llm.llm_engine.config.model.max_model_len
    model_cfg = llm.llm_engine.config.model
    # bytes per matmul weight for the bandwidth floor; None: no single figure (gguf block types vary)
    wbytes = {None: float(model_cfg.dtype.itemsize), "int8": 1.0}.get(model_cfg.quantization)
    settings = engine_settings(llm)
    decode = decode_request(requests)
    try:
        run_engine(llm, requests[:2], "warm-up", desc="warm-up")
        if ns.decode_repeats > 0:
            decode_step_s(llm, decode.engine_prompt(), 8)  # the batch-1 plan, outside the timed region
        steps = _decode(ns, report, llm, decode.engine_prompt(), "before")
        quiet(ns)
        res = run_engine(llm, requests, settings)
        steps += _decode(ns, report, llm, decode.engine_prompt(), "after")
    finally:
        llm.shutdown()
        del llm
        gc.collect()
    after = _ceilings(ns, report, "after")
    best = before.best(after) if before and after else None
    report.peers.append(res.result)
    report.engine = {**res.result.to_dict(), "prompt_tokens": res.prompt_tokens,
                     "prefix_cache_hit_rate": res.prefix_cache_hit_rate,
                     **_fractions(report, res, steps, best, load_hf_config(Path(model_dir)), wbytes)}
    report.extra["ceilings"] = {k: None if c is None else vars(c) for k, c in
                                (("before", before), ("after", after), ("best", best))}
    sub = requests[:ns.baseline_requests] if ns.baseline_requests else requests
    job = DecodeJob(decode, ns.decode_tokens, ns.decode_repeats) if ns.decode_repeats > 0 else None
    decodes: dict[str, list[float]] = {"engine": steps}
    for peer in offline_peers(ns, model_dir, gguf, max_model_len, decode=job):
        report.peers.append(peer.measure(sub, settle=lambda: quiet(ns)))
        if peer.decode_step_s:
            decodes[peer.name] = peer.decode_step_s
        gc.collect()
    _peer_notes(report, sub, requests, decodes)
    report.extra["decode_step_s"] = decodes
    report.extra["timeline"] = vars(res.timeline)
    report.extra["samples"] = {"ttft_s": res.ttft_s, "itl_s": res.itl_s}
    _plots(ns, report, res, len(requests))


def _fractions(report: Report, res: EngineRun, steps: list[float], c: Ceilings | None, hf_config: Any,
               wbytes: float | None) -> dict[str, Any]:
    """The engine against the machine: processed tokens/s over the fp32 compute ceiling at the
    workload's mean context, single-request decode over the bandwidth floor (as
    benchmarks/throughput.py always reported them)."""
    out: dict[str, Any] = {"processed_tok_s": (res.prompt_tokens + res.result.output_tokens) / res.result.seconds}
    if steps:
        step = min(steps)
        out.update(single_request_decode_ms=step * 1e3, single_request_decode_tok_s=1 / step)
    if c is None:
        report.notes.append("ceilings not measured (--ceilings none): no fractions")
        return out
    n = res.result.requests
    mean_ctx = (res.prompt_tokens + res.result.output_tokens / 2) / n
    flops = model_costs(hf_config, 4.0).workload_flops(res.prompt_tokens, res.result.output_tokens,
                                                         int(mean_ctx / 2))
    gflops = flops / res.result.seconds / 1e9
    ceiling_tps = (res.prompt_tokens + res.result.output_tokens) * c.fp32_gflops * 1e9 / flops
    out.update(fp32_compute_ceiling_tok_s=ceiling_tps, workload_gflops=gflops,
               fraction_of_fp32_compute_ceiling=gflops / c.fp32_gflops)
    report.notes.append(f"ceilings, best of before and after the engine ({c.threads} threads): read "
                        f"{c.read_gbps:.1f} GB/s, fp32 matmul {c.fp32_gflops:.0f} GFLOP/s, fp32 FMA peak "
                        f"{c.fp32_peak_gflops:.0f} GFLOP/s")
    peak = ""
    if c.fp32_peak_gflops > 0:
        out["fraction_of_fp32_fma_peak"] = gflops / c.fp32_peak_gflops
        peak = f", {out['fraction_of_fp32_fma_peak']:.0%} of the FMA peak"
    report.notes.append(f"engine processed {out['processed_tok_s']:.0f} tokens/s (prompt + output; {gflops:.0f} "
                        f"GFLOP/s, the LM head counted for sampled tokens only) = "
                        f"{out['fraction_of_fp32_compute_ceiling']:.0%} of the fp32 compute ceiling "
                        f"({ceiling_tps:.0f} tokens/s at mean context {int(mean_ctx / 2)}){peak}")
    if steps and wbytes is not None:
        floor = model_costs(hf_config, wbytes).decode_floor_s(c, context=100)
        out.update(decode_floor_ms=floor * 1e3, fraction_of_bandwidth_floor=floor / min(steps))
        report.notes.append(f"single-request decode {out['single_request_decode_ms']:.1f} ms/step "
                            f"({out['single_request_decode_tok_s']:.1f} tok/s) vs floor {floor * 1e3:.1f} ms = "
                            f"{out['fraction_of_bandwidth_floor']:.0%} of the bandwidth floor")
    elif steps:
        report.notes.append(f"single-request decode {out['single_request_decode_ms']:.1f} ms/step; no bandwidth "
                            "floor for these quantized weights (block sizes differ by tensor)")
    return out


def _peer_notes(report: Report, sub: list, requests: list, decodes: dict[str, list[float]]) -> None:
    if len(sub) < len(requests):
        report.notes.append(f"the peers ran the first {len(sub)} of {len(requests)} requests: rates are compared")
    engine = min(decodes["engine"]) if decodes["engine"] else None
    for name, steps in decodes.items():
        s = min(steps) if steps else 0.0
        if name != "engine" and s > 0 and engine:
            report.notes.append(f"{name} single-request decode {s * 1e3:.1f} ms/step ({1 / s:.1f} tok/s): "
                                f"the engine is {s / engine:.2f}x as fast")


def _plots(ns: argparse.Namespace, report: Report, res: EngineRun, n: int) -> None:
    ran = {p.name: p.tokens_per_s for p in report.peers if p.ran}
    plots.peers_bar(report.path("peers"), ran, "useful output tokens/s",
                    f"Offline throughput, {n} requests ({ns.dataset_name})")
    plots.timeline(report.path("timeline"), res.timeline.times, res.timeline.tokens_per_s, res.timeline.kv_usage,
                   "Engine: generation rate and KV-cache use")
    plots.latency_cdf(report.path("latency_cdf"), {"TTFT": {"engine": res.ttft_s}, "ITL": {"engine": res.itl_s}})
    plots.throughput_vs_concurrency(report.path("throughput_vs_concurrency"),
                                    {"engine": res.timeline.rate_by_running()}, "generated tokens/s",
                                    "running requests (the batch shrinks as requests finish)")

