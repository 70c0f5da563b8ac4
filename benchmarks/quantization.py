"""fp32 against int8 (``quantization="int8"``) on the same model, in one run.

    python benchmarks/quantization.py
    python benchmarks/quantization.py --model PATH --num-requests 16

Reports, for each: single-request decode (ms per step, median of interleaved repeats), the
throughput of the seeded workload of benchmarks/throughput.py (all requests at once), linear-layer
weight bytes, and perplexity on a fixed text computed from the engine's own prompt logprobs.
"""
from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import engine_decode_step_s, make_workload, run_engine  # noqa: E402

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based inks and a wooden press adapted from those used to make wine. Before "
    "him, books in Europe were copied by hand, a slow and expensive craft that kept them rare. Within fifty "
    "years of his first Bible, presses were running in more than two hundred cities, and millions of "
    "volumes had been printed. Cheaper books spread literacy, helped scholars share and check each other's "
    "work, and carried the arguments of the Reformation across the continent. Printers standardised "
    "spelling and grammar as they went, and the title page, page numbers and indexes became ordinary "
    "features of a book. Newspapers followed in the seventeenth century. The steam-powered press of the "
    "nineteenth century multiplied output again, and the rotary press fed by rolls of paper made daily "
    "papers with huge circulations possible. In the twentieth century offset lithography took over most "
    "commercial printing, and at its end digital typesetting and the laser printer put a press on every "
    "desk. Each step lowered the cost of copying words, and each time the number of readers and writers "
    "grew. Historians still debate how much the press caused the changes that followed and how much it "
    "only sped them up, but few doubt that the world after Gutenberg was a different place."
)


def linear_weight_bytes(llm) -> int:
    from engine.layers.linear import LinearBase

    model = llm.llm_engine.executor.worker.runner.model
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, LinearBase))


def perplexity(llm) -> float:
    from engine.sampling_params import SamplingParams

    ids = llm.get_tokenizer().encode(TEXT)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps))


def main() -> None:
    p = argparse.ArgumentParser(description="fp32 vs int8")
    p.add_argument("--model", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    from engine.entrypoints.llm import LLM

    engines = {name: LLM(args.model, quantization=q, enable_prefix_caching=False)
               for name, q in (("fp32", None), ("int8", "int8"))}
    vocab = engines["fp32"].llm_engine.config.model.vocab_size
    wl = make_workload(args.num_requests, vocab, seed=0)
    prompt = wl.prompts[1][:32]
    for llm in engines.values():
        engine_decode_step_s(llm, prompt, 8)  # warm-up
    steps: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        for name, llm in engines.items():
            steps[name].append(engine_decode_step_s(llm, prompt, 128))
    rows = {}
    for name, llm in engines.items():
        t = run_engine(llm, wl)
        rows[name] = {
            "decode_ms": statistics.median(steps[name]) * 1e3,
            "throughput": wl.num_output_tokens / t,
            "seconds": t,
            "linear_mb": linear_weight_bytes(llm) / 1e6,
            "ppl": perplexity(llm),
        }
    for llm in engines.values():
        llm.shutdown()
    del engines
    gc.collect()
    f, q = rows["fp32"], rows["int8"]
    print(f"\n{'':28s} {'fp32':>10s} {'int8':>10s} {'int8 vs fp32':>13s}")
    print(f"{'single-request decode ms':28s} {f['decode_ms']:10.1f} {q['decode_ms']:10.1f} {f['decode_ms'] / q['decode_ms']:12.2f}x")
    print(f"{args.num_requests}-request useful tok/s".ljust(28) + f" {f['throughput']:10.1f} {q['throughput']:10.1f} "
          f"{q['throughput'] / f['throughput']:12.2f}x")
    print(f"{'linear weights MB':28s} {f['linear_mb']:10.1f} {q['linear_mb']:10.1f} {q['linear_mb'] / f['linear_mb']:12.2f}x")
    print(f"{'perplexity (fixed text)':28s} {f['ppl']:10.3f} {q['ppl']:10.3f} {q['ppl'] / f['ppl'] - 1:+12.2%}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"({time.perf_counter() - t0:.0f} s)")
