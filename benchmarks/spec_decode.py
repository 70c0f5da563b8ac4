"""Speculative decoding benchmark: end-to-end speed-up and acceptance against no speculation,
in the same process, on a workload whose outputs repeat their inputs (code editing, quoting and
summarising a passage, reformatting a list).

Every configuration runs the same greedy requests; outputs are checked token for token against
the run without speculation. Configurations are interleaved request by request (batch by batch
with ``--batch``) over ``--repeats`` rounds, and the median of the rounds' total wall times is
reported, so load on a shared machine hits them alike; the per-round speed-ups show the noise. The draft model is a
truncated-layer copy of the default model that the benchmark writes itself (``--draft-layers``).

    python benchmarks/spec_decode.py                      # batch 1 (requests one at a time)
    python benchmarks/spec_decode.py --batch              # all requests submitted together
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402

PASSAGE = (
    "Paging cuts memory into fixed-size pages and keeps, for each program, a table that maps its "
    "virtual pages to physical frames. Pages can be loaded on demand, swapped out to disk when memory "
    "runs short, and shared between programs that use the same code. Serving large language models "
    "reuses the idea: the cache of keys and values of every request is cut into blocks, and a block "
    "table per request lets a server pack many more requests into the same memory."
)

CODE = '''def summarize(orders):
    total = 0
    count = 0
    for order in orders:
        if order["status"] != "paid":
            continue
        total += order["amount"]
        count += 1
    average = total / count if count else 0.0
    return {"total": total, "count": count, "average": average}
'''

WORKLOAD = [
    f"Rename the variable `total` to `revenue` in this Python function and return the whole updated function.\n\n{CODE}",
    f"Add a docstring to this Python function and return the whole function.\n\n{CODE}",
    f"Quote the first two sentences of this passage word for word.\n\n{PASSAGE}",
    f"Summarise this passage in two sentences, reusing its own words.\n\n{PASSAGE}",
    "Rewrite this list as a numbered list, keeping every item:\n- apples\n- pears\n- plums\n- cherries\n"
    "- grapes\n- lemons\n- oranges\n- peaches",
    f"Copy this code exactly, then explain it in one sentence.\n\n{CODE}",
]


def run(llm: LLM, prompts: list, params: SamplingParams) -> tuple[float, list[list[int]]]:
    """Submits ``prompts`` together and waits for all of them."""
    start = time.perf_counter()
    outs = llm.chat(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [o.outputs[0].token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ngram-k", default="2,4", help="num_speculative_tokens of the n-gram runs (comma-separated)")
    ap.add_argument("--draft-k", type=int, default=3, help="num_speculative_tokens of the draft-model run")
    ap.add_argument("--prompt-lookup-max", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--draft-layers", default="0-7",
                    help="decoder layers of the default model kept in the draft, e.g. '0-7' or '0-28' (empty: no draft run)")
    ap.add_argument("--batch", action="store_true", help="submit all requests together instead of one at a time")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from engine.models.default_model import resolve_default_model
    from engine.spec_decode.truncate import make_truncated_draft

    common = dict(kv_cache_memory_bytes=256 << 20, max_model_len=2048)
    configs: dict = {"baseline": None}
    for k in (int(x) for x in args.ngram_k.split(",") if x):
        configs[f"ngram k={k}"] = {"method": "ngram", "num_speculative_tokens": k,
                                   "prompt_lookup_min": 1, "prompt_lookup_max": args.prompt_lookup_max}
    if args.draft_layers:
        lo, _, hi = args.draft_layers.partition("-")
        layers = list(range(int(lo), int(hi or lo) + 1))
        draft_dir = Path(tempfile.gettempdir()) / f"paged-engine-draft-{layers[0]}-{layers[-1]}"
        draft = make_truncated_draft(resolve_default_model(), draft_dir, layers)
        configs[f"draft {len(layers)}L k={args.draft_k}"] = {"method": "draft_model", "model": str(draft),
                                                             "num_speculative_tokens": args.draft_k}
    engines = {name: LLM(speculative_config=spec, **common) for name, spec in configs.items()}
    prompts = [[{"role": "user", "content": w}] for w in WORKLOAD]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    for llm in engines.values():  # warm-up
        run(llm, prompts[:1], SamplingParams(temperature=0.0, max_tokens=4))

    # interleaved finely (request by request, or batch by batch) so load changes on a shared
    # machine hit every configuration alike; per round each configuration's times are summed
    units = [prompts] if args.batch else [[p] for p in prompts]
    times: dict[str, list[float]] = {n: [] for n in configs}
    outputs: dict[str, list[list[int]]] = {n: [] for n in configs}
    before = {n: e.get_stats() for n, e in engines.items()}
    for r in range(args.repeats):
        for n in configs:
            times[n].append(0.0)
        for unit in units:
            for name, llm in engines.items():
                t, toks = run(llm, unit, params)
                times[name][-1] += t
                if r == 0:
                    outputs[name] += toks
    base_t = statistics.median(times["baseline"])
    num_tokens = sum(len(t) for t in outputs["baseline"])
    print(f"workload: {len(prompts)} chat requests, greedy, max_tokens={args.max_tokens}, "
          f"{'batched' if args.batch else 'one at a time'}, {num_tokens} output tokens, "
          f"torch threads={torch.get_num_threads()}, repeats={args.repeats}")
    print(f"{'config':<20} {'time s':>8} {'tok/s':>8} {'speed-up':>9} {'accept':>8} {'mean len':>9} {'identical':>10}")
    results = []
    for name, llm in engines.items():
        s, b = llm.get_stats(), before[name]
        drafts = s["spec_num_drafts"] - b["spec_num_drafts"]
        proposed = s["spec_num_draft_tokens"] - b["spec_num_draft_tokens"]
        accepted = s["spec_num_accepted_tokens"] - b["spec_num_accepted_tokens"]
        t = statistics.median(times[name])
        same = sum(a == c for a, c in zip(outputs[name], outputs["baseline"]))
        row = {
            "config": name, "time_s": t, "tokens_per_s": num_tokens / t, "speedup": base_t / t,
            "acceptance_rate": accepted / proposed if proposed else None,
            "mean_accepted_length": 1 + accepted / drafts if drafts else None,
            "identical_outputs": f"{same}/{len(prompts)}", "times": times[name],
            "speedup_per_round": [b / x for b, x in zip(times["baseline"], times[name])],
        }
        results.append(row)
        acc = f"{row['acceptance_rate']:.1%}" if proposed else "-"
        mal = f"{row['mean_accepted_length']:.2f}" if drafts else "-"
        rounds = " ".join(f"{x:.2f}" for x in row["speedup_per_round"])
        print(f"{name:<20} {t:8.2f} {row['tokens_per_s']:8.1f} {row['speedup']:8.2f}x {acc:>8} {mal:>9} {row['identical_outputs']:>10}   rounds: {rounds}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
