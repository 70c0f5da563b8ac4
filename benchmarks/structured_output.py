"""Structured outputs: what a JSON-schema constraint costs per token, at first token and to compile.

    python benchmarks/structured_output.py                 # 64 requests, the default model (~10 min on 2 cores)
    python benchmarks/structured_output.py --requests 16 --json out.json

In one run, on the seeded workload of benchmarks/throughput.py (random prompts of 16..512 tokens,
outputs of 16..256 tokens):
- 64 concurrent requests unconstrained vs every request under a JSON schema: an array of integers
  with ``minItems`` large enough that the array cannot close, so each request generates exactly its
  output length (``ignore_eos`` for the unconstrained run), and the per-token overhead is
  (constrained time / unconstrained time - 1) for the same token count;
- batch 1: the same comparison one request at a time (a few requests);
- time to first token (one request, ``max_tokens=1``) unconstrained vs with a cached grammar,
  median of repeated runs;
- the first compile of a 30-field object schema (the tokenizer already read), median of fresh ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import make_workload  # noqa: E402

LONG_ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1000}


def thirty_fields(salt: int) -> dict:
    kinds = [{"type": "integer"}, {"type": "string", "maxLength": 20}, {"type": "boolean"},
             {"type": "number"}, {"enum": ["a", "b", "c"]}, {"type": "array", "items": {"type": "integer"}}]
    props = {f"field_{salt}_{i}": kinds[i % len(kinds)] for i in range(30)}
    return {"type": "object", "properties": props, "required": list(props)}


class Attributed:
    """Seconds spent in the structured-output code of the step (bitmask fill, matcher advance,
    attaching and applying the mask), summed: an overhead figure measured inside the constrained
    run itself, so it does not depend on how busy the machine was between two runs."""

    def __init__(self) -> None:
        import engine.sample.sampler as sampler
        import engine.worker.model_runner as runner
        from engine.structured_output.manager import StructuredOutputManager

        self.seconds = 0.0
        for owner, name in ((StructuredOutputManager, "fill_bitmask"), (StructuredOutputManager, "advance"),
                            (StructuredOutputManager, "validate_drafts"), (sampler, "apply_grammar_bitmask"),
                            (runner, "attach_grammar")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return timed


def run(llm, prompts, output_lens, constrained: bool) -> float:
    from engine import SamplingParams
    from engine.structured_output import StructuredOutputsParams

    so = StructuredOutputsParams(json=LONG_ARRAY, disable_any_whitespace=True) if constrained else None
    params = [SamplingParams(temperature=0, max_tokens=o, ignore_eos=not constrained, structured_outputs=so)
              for o in output_lens]
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    got = [len(o.outputs[0].token_ids) for o in outs]
    if got != list(output_lens):
        raise RuntimeError(f"other lengths than requested (constrained={constrained}): {got[:8]}")
    if constrained:
        for o in outs:
            assert o.outputs[0].text.startswith("["), o.outputs[0].text[:40]
    return elapsed


def ttft(llm, prompt, constrained: bool, repeats: int) -> float:
    from engine import SamplingParams
    from engine.structured_output import StructuredOutputsParams

    so = StructuredOutputsParams(json=LONG_ARRAY, disable_any_whitespace=True) if constrained else None
    params = SamplingParams(temperature=0, max_tokens=1, structured_outputs=so)
    llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)  # warm: grammar compiled, prefix cached
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def first_compile(llm, repeats: int) -> tuple[float, float]:
    """(median seconds of backend.compile, median seconds from submit to a ready future) for fresh
    30-field schemas (each one new, so nothing is cached)."""
    from engine.structured_output import StructuredOutputsParams

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch1-requests", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the figures here")
    args = ap.parse_args()

    from engine import LLM

    llm = LLM(args.model, max_model_len=1024, enable_prefix_caching=False)
    attributed = Attributed()
    vocab = llm.llm_engine.config.model.vocab_size
    wl = make_workload(args.requests, vocab, args.seed)
    tokens = wl.num_output_tokens
    res: dict[str, float] = {}
    comp, pooled = first_compile(llm, 5)
    res["first_compile_30_fields_ms"] = comp * 1e3
    res["first_compile_30_fields_via_pool_ms"] = pooled * 1e3
    run(llm, wl.prompts[:2], [8, 8], False)  # warm both paths (kernel plans, the grammar)
    run(llm, wl.prompts[:2], [8, 8], True)
    t_u = run(llm, wl.prompts, wl.output_lens, False)
    attributed.seconds = 0.0
    t_c = run(llm, wl.prompts, wl.output_lens, True)
    a_n = attributed.seconds
    res.update(concurrent_unconstrained_s=t_u, concurrent_constrained_s=t_c, concurrent_tokens=tokens,
               concurrent_overhead_pct=(t_c / t_u - 1) * 100, concurrent_attributed_s=a_n,
               concurrent_attributed_pct=a_n / (t_c - a_n) * 100)
    k = args.batch1_requests
    b1_u = sum(run(llm, [p], [o], False) for p, o in zip(wl.prompts[:k], wl.output_lens[:k]))
    attributed.seconds = 0.0
    b1_c = sum(run(llm, [p], [o], True) for p, o in zip(wl.prompts[:k], wl.output_lens[:k]))
    a1 = attributed.seconds
    res.update(batch1_unconstrained_s=b1_u, batch1_constrained_s=b1_c, batch1_tokens=sum(wl.output_lens[:k]),
               batch1_overhead_pct=(b1_c / b1_u - 1) * 100, batch1_attributed_s=a1,
               batch1_attributed_pct=a1 / (b1_c - a1) * 100)
    prompt = wl.prompts[0]
    tu, tc = ttft(llm, prompt, False, 9), ttft(llm, prompt, True, 9)
    res.update(ttft_unconstrained_ms=tu * 1e3, ttft_cached_grammar_ms=tc * 1e3, ttft_delta_ms=(tc - tu) * 1e3)
    llm.llm_engine.kv_cache.check_invariants()
    print()
    print("| measure | unconstrained | JSON schema | end-to-end difference | in structured-output code | target |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.requests} concurrent requests, {tokens} output tokens | {t_u:.1f} s | {t_c:.1f} s | "
          f"{res['concurrent_overhead_pct']:+.1f}% per token | {a_n:.2f} s = {res['concurrent_attributed_pct']:.1f}% | <= 10% |")
    print(f"| batch 1, {k} requests, {res['batch1_tokens']} tokens | {b1_u:.2f} s | {b1_c:.2f} s | "
          f"{res['batch1_overhead_pct']:+.1f}% per token | {a1:.3f} s = {res['batch1_attributed_pct']:.1f}% | <= 15% |")
    print(f"| time to first token (cached grammar) | {tu * 1e3:.1f} ms | {tc * 1e3:.1f} ms | "
          f"{res['ttft_delta_ms']:+.1f} ms | | <= 5 ms |")
    print(f"| first compile, 30-field schema | | {comp * 1e3:.1f} ms ({pooled * 1e3:.1f} ms through the pool) | "
          "| | < 100 ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    llm.shutdown()


if __name__ == "__main__":
    main()
