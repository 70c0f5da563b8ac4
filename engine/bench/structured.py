"""``bench structured``: what a JSON-schema constraint costs per token, at first token and to compile,
in one run on one engine:

- the workload (default ``random-ids``: benchmarks/throughput.py's) all at once, unconstrained and
  with every request under a JSON schema (an integer array whose ``minItems`` keeps it open, so each
  request still generates exactly its output length); the per-token overhead is constrained time /
  unconstrained time - 1 for the same tokens;
- the same one request at a time (``--batch1-requests``);
- the seconds spent inside the structured-output code of each constrained run (bitmask fill,
  matcher advance, attaching and applying the mask: ``Attributed``), which do not depend on how busy
  the machine was between the two runs;
- time to first token of one short request (``max_tokens=1``) unconstrained and with a cached
  grammar, alternating, median of ``--ttft-repeats`` each;
- the first compile of a fresh 30-field object schema (the tokenizer already read), median of
  ``--compile-repeats``, directly and through the compile pool."""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from engine.bench import plots
from engine.bench.common import add_common_args, dataset_from, engine_kwargs, engine_settings, model_paths, quiet
from engine.bench.datasets import BenchRequest
from engine.bench.engine_run import EngineRun, greedy, run_engine
from engine.bench.peers import PeerResult
from engine.bench.report import Report, machine_info

LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}


def add_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p, dataset="random-ids")
    g = p.add_argument_group("structured")
    g.add_argument("--batch1-requests", type=int, default=3, help="requests run one at a time both ways (0: none)")
    g.add_argument("--ttft-repeats", type=int, default=21, help="timed first tokens each way, alternating (0: none)")
    g.add_argument("--compile-repeats", type=int, default=5, help="fresh 30-field schemas compiled (0: none)")


def thirty_fields(salt: int) -> dict:
    kinds = [{"type": "integer"}, {"type": "string", "maxLength": 20}, {"type": "boolean"},
             {"type": "number"}, {"enum": ["a", "b", "c"]}, {"type": "array", "items": {"type": "integer"}}]
    props = {f"field_{salt}_{i}": kinds[i % len(kinds)] for i in range(30)}
    return {"type": "object", "properties": props, "required": list(props)}


def _targets() -> list[tuple[Any, str]]:
    """Where a step runs structured-output code: (owner, attribute) pairs that ``Attributed`` times.
    A missing one fails loudly: an attribution that silently lost a part would flatter the figure."""
    import engine.sample.sampler as sampler
    import engine.spec_decode.verify as verify
    import engine.worker.model_runner as runner
    from engine.structured_output.manager import StructuredOutputManager as Manager

    return [(Manager, "fill_bitmask"), (Manager, "advance"), (Manager, "validate_drafts"),
            (sampler, "apply_grammar_bitmask"), (runner, "attach_grammar"), (verify, "attach_grammar")]


@dataclass
class Attributed:
    """Seconds spent in the structured-output code of the step, summed, while the context is
    entered: ``with Attributed() as a: ...; a.seconds``. The wrapped functions are put back on exit."""
    seconds: float = 0.0
    _saved: list[tuple[Any, str, Callable]] = field(default_factory=list)

    def __enter__(self) -> "Attributed":
        for owner, name in _targets():
            fn = getattr(owner, name)
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._timed(fn))
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    def _timed(self, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def _constraint() -> Any:
    from engine.structured_output.params import StructuredOutputsParams

    return StructuredOutputsParams(json=LONG_ARRAY, disable_any_whitespace=True)


def _timed_run(llm: Any, requests: list[BenchRequest], constrained: bool, settings: str, desc: str
               ) -> tuple[EngineRun, float]:
    """A run of ``requests`` all at once, and its seconds inside structured-output code."""
    params = [greedy(r, structured_outputs=_constraint()) if constrained else greedy(r) for r in requests]
    with Attributed() as a:
        res = run_engine(llm, requests, settings, params=params, desc=desc)
    if res.result.output_tokens != sum(r.output_len for r in requests):
        raise RuntimeError(f"other lengths than requested (constrained={constrained})")
    return res, a.seconds


TTFT_PROMPT_TOKENS = 32  # short, so a prefill's own jitter does not drown a few milliseconds


def ttft_s(llm: Any, r: BenchRequest, repeats: int) -> tuple[float, float]:
    """Median seconds from submission to the one token of ``max_tokens=1``, (unconstrained, with a
    cached grammar), on the first ``TTFT_PROMPT_TOKENS`` tokens of ``r``'s prompt. The two kinds
    alternate run by run, so a drift of the machine's speed moves both alike; the grammar is
    compiled and cached by an untimed first call."""
    from engine.sampling_params import SamplingParams

    prompt = r.engine_prompt()
    if isinstance(prompt, dict):
        prompt = {"prompt_token_ids": prompt["prompt_token_ids"][:TTFT_PROMPT_TOKENS]}
    kinds = [SamplingParams(temperature=0, max_tokens=1, structured_outputs=c)
             for c in (None, _constraint())]
    for params in kinds:
        llm.generate([prompt], params, use_tqdm=False)
    times: list[list[float]] = [[], []]
    for _ in range(repeats):
        for i, params in enumerate(kinds):
            start = time.perf_counter()
            llm.generate([prompt], params, use_tqdm=False)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def first_compile_s(llm: Any, repeats: int) -> tuple[float, float]:
    """(median seconds of backend.compile, median seconds from submit to a ready future) for fresh
    30-field schemas (each one new, so nothing is cached)."""
    from engine.structured_output.params import StructuredOutputsParams

    mgr = llm.llm_engine.structured_output
    mgr.backend.compiler()  # the tokenizer is read once per engine, not per schema
    direct, pooled = [], []
    for i in range(repeats):
        p = StructuredOutputsParams(json=thirty_fields(2 * i))
        start = time.perf_counter()
        mgr.backend.compile(p)
        direct.append(time.perf_counter() - start)
        p = StructuredOutputsParams(json=thirty_fields(2 * i + 1))
        start = time.perf_counter()
        mgr.submit(p, count=False).result()
        pooled.append(time.perf_counter() - start)
    return statistics.median(direct), statistics.median(pooled)


@contextmanager
def _engine(ns: argparse.Namespace) -> Iterator[Any]:
    from engine.entrypoints.llm import LLM

    llm = LLM(ns.model, **engine_kwargs(ns))
    try:
        yield llm
    finally:
        llm.shutdown()
        del llm
        gc.collect()


def _pct(constrained: float, free: float) -> float | None:
    return (constrained / free - 1) * 100 if free > 0 else None


def run(ns: argparse.Namespace, report: Report) -> None:
    model_dir, _ = model_paths(ns)
    requests = dataset_from(ns, model_dir)
    report.machine = machine_info(quiet(ns))
    res: dict[str, Any] = {}
    with _engine(ns) as llm:
        settings = engine_settings(llm)
        if ns.compile_repeats > 0:
            comp, pooled = first_compile_s(llm, ns.compile_repeats)
            res.update(first_compile_30_fields_ms=comp * 1e3, first_compile_30_fields_via_pool_ms=pooled * 1e3)
        warm = [BenchRequest(r.prompt, r.input_words, min(r.output_len, 8), r.prompt_token_ids) for r in requests[:2]]
        _timed_run(llm, warm, False, "warm-up", "warm-up")  # kernel plans, and the grammar compiled
        _timed_run(llm, warm, True, "warm-up", "warm-up (compiles the grammar)")
        quiet(ns)
        free, _ = _timed_run(llm, requests, False, f"{settings}, unconstrained", "unconstrained")
        quiet(ns)
        json_run, a_n = _timed_run(llm, requests, True, f"{settings}, JSON schema (xgrammar)", "JSON schema")
        t_u, t_c = free.result.seconds, json_run.result.seconds
        res.update(concurrent_unconstrained_s=t_u, concurrent_constrained_s=t_c,
                   concurrent_tokens=json_run.result.output_tokens, concurrent_overhead_pct=_pct(t_c, t_u),
                   concurrent_attributed_s=a_n, concurrent_attributed_pct=a_n / (t_c - a_n) * 100)
        k = min(ns.batch1_requests, len(requests))
        if k > 0:
            quiet(ns)
            b1_u = sum(_timed_run(llm, [r], False, "", "batch 1")[0].result.seconds for r in requests[:k])
            b1 = [_timed_run(llm, [r], True, "", "batch 1, JSON") for r in requests[:k]]
            b1_c, a1 = sum(r.result.seconds for r, _ in b1), sum(a for _, a in b1)
            res.update(batch1_requests=k, batch1_unconstrained_s=b1_u, batch1_constrained_s=b1_c,
                       batch1_tokens=sum(r.output_len for r in requests[:k]), batch1_overhead_pct=_pct(b1_c, b1_u),
                       batch1_attributed_s=a1, batch1_attributed_pct=a1 / (b1_c - a1) * 100)
        if ns.ttft_repeats > 0:
            quiet(ns)
            tu, tc = ttft_s(llm, requests[0], ns.ttft_repeats)
            res.update(ttft_unconstrained_ms=tu * 1e3, ttft_cached_grammar_ms=tc * 1e3, ttft_delta_ms=(tc - tu) * 1e3)
    free.result.name, json_run.result.name = "engine (unconstrained)", "engine (JSON schema)"
    report.peers += [free.result, json_run.result]
    report.engine = {**json_run.result.to_dict(), "per_token_overhead": (res["concurrent_overhead_pct"] or 0) / 100,
                     **res}
    report.notes += table(res, len(requests))
    if ns.peers not in ("none", ""):
        report.peers.append(PeerResult("vLLM CPU (structured)", "", ran=False,
                                       reason="bench structured compares the engine with itself; "
                                              "peers run in bench throughput / serve"))
    report.extra["samples"] = {"ttft_s_unconstrained": free.ttft_s, "ttft_s_json": json_run.ttft_s,
                               "itl_s_unconstrained": free.itl_s, "itl_s_json": json_run.itl_s}
    report.extra["timeline"] = vars(json_run.timeline)
    _plots(report, free, json_run, len(requests))


def table(res: dict[str, Any], n: int) -> list[str]:
    """docs/structured_outputs.md's table, as markdown rows."""
    rows = ["| measure | unconstrained | JSON schema | end-to-end difference | in structured-output code | target |",
            "|---|---|---|---|---|---|",
            f"| {n} concurrent requests, {res['concurrent_tokens']} output tokens | "
            f"{res['concurrent_unconstrained_s']:.2f} s | {res['concurrent_constrained_s']:.2f} s | "
            f"{res['concurrent_overhead_pct']:+.1f}% per token | {res['concurrent_attributed_s']:.2f} s = "
            f"{res['concurrent_attributed_pct']:.1f}% | <= 10% |"]
    if "batch1_tokens" in res:
        rows.append(f"| batch 1, {res['batch1_requests']} requests, {res['batch1_tokens']} tokens | "
                    f"{res['batch1_unconstrained_s']:.2f} s | {res['batch1_constrained_s']:.2f} s | "
                    f"{res['batch1_overhead_pct']:+.1f}% per token | {res['batch1_attributed_s']:.3f} s = "
                    f"{res['batch1_attributed_pct']:.1f}% | <= 15% |")
    if "ttft_delta_ms" in res:
        rows.append(f"| time to first token (cached grammar) | {res['ttft_unconstrained_ms']:.1f} ms | "
                    f"{res['ttft_cached_grammar_ms']:.1f} ms | {res['ttft_delta_ms']:+.1f} ms | | <= 5 ms |")
    if "first_compile_30_fields_ms" in res:
        rows.append(f"| first compile, 30-field schema | | {res['first_compile_30_fields_ms']:.1f} ms "
                    f"({res['first_compile_30_fields_via_pool_ms']:.1f} ms through the pool) | | | < 100 ms |")
    return rows


def _plots(report: Report, free: EngineRun, json_run: EngineRun, n: int) -> None:
    plots.peers_bar(report.path("peers"), {p.name: p.tokens_per_s for p in report.peers if p.ran},
                    "output tokens/s", f"JSON-schema constraint on {n} requests")
    plots.latency_cdf(report.path("latency_cdf"),
                      {"TTFT": {"free": free.ttft_s, "JSON": json_run.ttft_s},
                       "ITL": {"free": free.itl_s, "JSON": json_run.itl_s}})
    plots.timeline(report.path("timeline"), json_run.timeline.times, json_run.timeline.tokens_per_s,
                   json_run.timeline.kv_usage, "Engine under a JSON schema: generation rate and KV-cache use")
    plots.throughput_vs_concurrency(report.path("throughput_vs_concurrency"),
                                    {"unconstrained": free.timeline.rate_by_running(),
                                     "JSON schema": json_run.timeline.rate_by_running()},
                                    "generated tokens/s", "running requests")
