"""fp32 against int8 (``quantization="int8"``) on the same model, in one run.

    python benchmarks/quantization.py                 # the embedded SmolLM2-135M
    python benchmarks/quantization.py --model PATH --repeats 5

Reports, for each: single-request decode (32-token prompt, 128 greedy tokens, ignore_eos; the two
engines interleaved, median of the repeats), decode throughput with 64 requests at once, the prefill
time of one 1,024-token prompt, weight bytes, and perplexity on the fixed text below computed from
the engine's own prompt logprobs.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

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
    "only sped them up, but few doubt that the world after Gutenberg was a different place.\n\n"
    "A kitchen garden needs less space than most people think. A bed one metre wide and three metres long, "
    "dug deeply once and then never walked on, can feed a family with salad from late spring to the first "
    "frosts. The soil matters more than anything else: dark, crumbly earth full of worms holds water after "
    "rain and lets it drain when there is too much. Compost made from kitchen scraps, grass cuttings and "
    "fallen leaves, turned every few weeks and left for a year, is the cheapest way to get it. Sow little "
    "and often: a short row of lettuce every fortnight gives a steady supply instead of a glut that bolts "
    "in the first hot week. Beans and peas climb, so they take little ground; courgettes sprawl and one "
    "plant is usually enough. Water in the evening, at the roots rather than on the leaves, and a layer "
    "of straw or dry grass over the soil will keep it moist through a dry spell. Slugs are the gardener's "
    "oldest enemy; a torch and a bucket after dark remain the most reliable remedy.\n\n"
    "To make bread, mix five hundred grams of strong flour with ten grams of salt and seven grams of dried "
    "yeast, then add about three hundred and fifty millilitres of warm water and stir until no dry flour "
    "is left. Knead the dough on a lightly floured surface for ten minutes, until it is smooth and springs "
    "back when pressed. Put it in a bowl, cover it, and leave it somewhere warm until it has doubled in "
    "size, which takes an hour or two. Knock it back, shape it into a loaf, and let it rise again on a "
    "baking tray or in a tin. Bake it in a hot oven for thirty to thirty-five minutes. The loaf is done "
    "when it sounds hollow when tapped underneath; let it cool on a rack before cutting, or the crumb "
    "will be gummy. A spoonful of honey or a handful of seeds changes the character of the bread, and "
    "replacing a fifth of the flour with wholemeal gives it more flavour without making it heavy.\n\n"
    "Light from the Sun takes a little over eight minutes to reach the Earth, and about five and a half "
    "hours to reach Pluto. The nearest star beyond the Sun is more than four light years away, so the "
    "light we see from it left before anyone now in primary school was born. Our galaxy, the Milky Way, "
    "is a flattened disc about a hundred thousand light years across, holding a few hundred billion "
    "stars; the Sun sits in one of its spiral arms, roughly halfway from the centre to the edge. On a "
    "dark night away from city lights the disc is visible as a pale band across the sky. Beyond it lie "
    "other galaxies, so many that a patch of sky the size of a grain of sand held at arm's length "
    "contains thousands of them when photographed for long enough by a large telescope."
)


def weight_bytes(llm) -> tuple[int, int]:
    """(bytes of all parameters, bytes of the matmul weights: linear layers and LM head), tied
    tensors counted once."""
    from engine.layers.embedding import ParallelLMHead
    from engine.layers.linear import LinearBase

    model = llm.llm_engine.executor.worker.runner.model
    total = llm.llm_engine.executor.worker.weight_bytes()
    mats = {id(m.weight): m.weight for m in model.modules() if isinstance(m, (LinearBase, ParallelLMHead))}
    return total, sum(w.numel() * w.element_size() for w in mats.values())


def decode_tok_s(llm, prompt: list[int], n: int) -> float:
    """Tokens per second of one request alone, first token to last."""
    from engine.sampling_params import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                       use_tqdm=False)[0]
    return (n - 1) / (out.metrics.finished_time - out.metrics.first_token_time)


def batch_tok_s(llm, prompts: list[list[int]], n: int) -> float:
    """Output tokens per second with every request submitted at once."""
    from engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == n for o in outs)
    return len(prompts) * n / (time.perf_counter() - start)


def prefill_s(llm, prompt: list[int]) -> float:
    from engine.sampling_params import SamplingParams

    start = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
    return time.perf_counter() - start


def perplexity(llm, ids: list[int]) -> tuple[float, list[float]]:
    from engine.sampling_params import SamplingParams

    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    lps = [next(iter(d.values())).logprob for d in out.prompt_logprobs[1:]]
    return math.exp(-sum(lps) / len(lps)), lps


def main() -> None:
    p = argparse.ArgumentParser(description="fp32 vs int8")
    p.add_argument("--model", default=None, help="a model path or name (default: the embedded SmolLM2-135M)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=64, help="requests in the batched-decode run (0 skips it)")
    args = p.parse_args()
    from engine.entrypoints.llm import LLM

    t0 = time.perf_counter()
    engines = {name: LLM(args.model, quantization=q, enable_prefix_caching=False, num_gpu_blocks_override=1024)
               for name, q in (("fp32", None), ("int8", "int8"))}
    tok = engines["fp32"].get_tokenizer()
    text_ids = tok.encode(TEXT)
    g = __import__("random").Random(0)
    vocab = engines["fp32"].llm_engine.config.model.vocab_size
    rand = lambda n: [g.randrange(100, vocab) for _ in range(n)]  # noqa: E731
    prompt, long_prompt = text_ids[:32], (text_ids * 2)[:1024]
    batch_prompts = [rand(32) for _ in range(args.batch)]
    for llm in engines.values():  # warm-up
        decode_tok_s(llm, prompt, 8)
        prefill_s(llm, long_prompt)
    decode: dict[str, list[float]] = {k: [] for k in engines}
    prefill: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
        for name, llm in engines.items():
            decode[name].append(decode_tok_s(llm, prompt, 128))
            prefill[name].append(prefill_s(llm, long_prompt))
    rows = {}
    for name, llm in engines.items():
        ppl, lps = perplexity(llm, text_ids)
        rows[name] = {
            "decode": statistics.median(decode[name]),
            "prefill": statistics.median(prefill[name]) * 1e3,
            "batch": batch_tok_s(llm, batch_prompts, 64) if args.batch else float("nan"),
            "bytes": weight_bytes(llm),
            "ppl": ppl,
            "lps": lps,
        }
    for llm in engines.values():
        llm.shutdown()
    f, q = rows["fp32"], rows["int8"]
    dlp = [abs(a - b) for a, b in zip(f["lps"], q["lps"])]
    print(f"\n{'':36s} {'fp32':>10s} {'int8':>10s} {'int8 / fp32':>12s}")
    print(f"{'single-request decode, tokens/s':36s} {f['decode']:10.1f} {q['decode']:10.1f} {q['decode'] / f['decode']:11.2f}x")
    print(f"{f'{args.batch}-request decode, output tokens/s':36s} {f['batch']:10.1f} {q['batch']:10.1f} "
          f"{q['batch'] / f['batch']:11.2f}x")
    print(f"{'prefill of 1,024 tokens, ms':36s} {f['prefill']:10.1f} {q['prefill']:10.1f} {q['prefill'] / f['prefill']:11.2f}x")
    print(f"{'matmul weights, MB':36s} {f['bytes'][1] / 1e6:10.1f} {q['bytes'][1] / 1e6:10.1f} "
          f"{q['bytes'][1] / f['bytes'][1]:11.2f}x")
    print(f"{'all parameters, MB':36s} {f['bytes'][0] / 1e6:10.1f} {q['bytes'][0] / 1e6:10.1f} "
          f"{q['bytes'][0] / f['bytes'][0]:11.2f}x")
    print(f"{f'perplexity ({len(text_ids)}-token text)':36s} {f['ppl']:10.3f} {q['ppl']:10.3f} {q['ppl'] / f['ppl'] - 1:+11.2%}")
    print(f"{'mean / max |logprob change|':36s} {'':10s} {sum(dlp) / len(dlp):10.3f} {max(dlp):11.3f}")
    print(f"(decode: median of {args.repeats} interleaved runs of 128 tokens after a 32-token prompt; "
          f"{time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
