"""Seeded synthetic workloads with vLLM's dataset names: ``random``, ``sharegpt-like`` and
``prefix-repetition``, and ``random-ids``. The first three are text (common English words, about one
token each for BPE tokenizers), so every peer (the engine, transformers, vLLM, llama.cpp, a server)
gets the same input. ``random-ids`` is random token ids, the engine's long-standing throughput
workload (``make_workload``: prompts of 16..512 tokens, outputs of 16..256 unless lengths are
given); the peers receive the ids themselves, so they too see the same input. Each request has an
exact output length (the runs use ``ignore_eos``)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

DATASETS = ("random", "sharegpt-like", "prefix-repetition", "random-ids")
# random-ids without --input-len / --output-len: the ranges of benchmarks/throughput.py's workload
CLASSIC_PROMPT_RANGE, CLASSIC_OUTPUT_RANGE = (16, 512), (16, 256)

_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up "
    "other about out many then them these so some her would make like him into time has look two more write "
    "go see number no way could people my than first water been call who oil its now find long down day did "
    "get come made may part over new sound take only little work know place year live me back give most very "
    "after thing our just name good sentence man think say great where help through much before line right "
    "too mean old any same tell boy follow came want show also around form three small set put end does"
).split()


@dataclass
class BenchRequest:
    prompt: str  # text; for random-ids a placeholder (the ids are the prompt)
    input_words: int  # words of text, or tokens of prompt_token_ids
    output_len: int
    prompt_token_ids: list[int] | None = None

    def engine_prompt(self) -> str | dict:
        """What ``LLM.generate`` / ``LLMEngine.add_request`` take for this prompt."""
        return self.prompt if self.prompt_token_ids is None else {"prompt_token_ids": self.prompt_token_ids}


@dataclass
class Workload:
    """Token-id prompts and their exact output lengths (benchmarks/throughput.py's workload type)."""
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def num_output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def head(self, n: int) -> "Workload":
        return Workload(self.prompts[:n], self.output_lens[:n])

    def requests(self) -> list[BenchRequest]:
        return [BenchRequest(f"<{len(p)} token ids>", len(p), o, p) for p, o in zip(self.prompts, self.output_lens)]


def make_workload(n: int, vocab_size: int, seed: int, prompt_range: tuple[int, int] = CLASSIC_PROMPT_RANGE,
                  output_range: tuple[int, int] = CLASSIC_OUTPUT_RANGE) -> Workload:
    """``n`` seeded requests of random token ids (ids under 100 are left out: special tokens)."""
    rng = random.Random(seed)
    prompts, outs = [], []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        prompts.append([rng.randrange(100, vocab_size) for _ in range(plen)])
        outs.append(rng.randint(*output_range))
    return Workload(prompts, outs)


@dataclass
class DatasetArgs:
    name: str = "random"
    num_prompts: int = 64
    input_len: int | None = 128  # None: random-ids' classic range (other datasets need a length)
    output_len: int | None = 64
    range_ratio: float = 0.5  # random: lengths uniform in mean * (1 +- ratio)
    prefix_len: int = 256  # prefix-repetition: words shared by the prompts of one prefix
    num_prefixes: int = 4
    seed: int = 0
    vocab_size: int | None = None  # random-ids: ids are drawn from [100, vocab_size)


def length_range(mean: int, ratio: float) -> tuple[int, int]:
    return max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(max(n, 1))]


def make_dataset(a: DatasetArgs) -> list[BenchRequest]:
    if a.name not in DATASETS:
        raise ValueError(f"--dataset-name {a.name!r} is not one of {', '.join(DATASETS)}")
    lens = [n for n in (a.input_len, a.output_len) if n is not None]
    if a.num_prompts < 1 or min(lens, default=1) < 1 or not 0 <= a.range_ratio < 1:
        raise ValueError("need --num-prompts, --input-len, --output-len >= 1 and 0 <= --range-ratio < 1")
    if a.name == "random-ids":
        if not a.vocab_size:
            raise ValueError("random-ids needs the model's vocab_size")
        p_range = CLASSIC_PROMPT_RANGE if a.input_len is None else length_range(a.input_len, a.range_ratio)
        o_range = CLASSIC_OUTPUT_RANGE if a.output_len is None else length_range(a.output_len, a.range_ratio)
        return make_workload(a.num_prompts, a.vocab_size, a.seed, p_range, o_range).requests()
    if a.input_len is None or a.output_len is None:
        raise ValueError(f"--dataset-name {a.name} needs --input-len and --output-len")
    rng = random.Random(a.seed)

    def uniform(mean: int) -> int:
        return rng.randint(*length_range(mean, a.range_ratio))

    def lognormal(mean: int, sigma: float = 0.8) -> int:
        # heavy-tailed like ShareGPT's turns (median below the mean), capped at 4x the mean
        mu = math.log(mean) - sigma * sigma / 2
        return max(1, min(4 * mean, round(rng.lognormvariate(mu, sigma))))

    prefixes = [_words(rng, a.prefix_len) for _ in range(max(a.num_prefixes, 1))] if a.name == "prefix-repetition" else []
    out = []
    for i in range(a.num_prompts):
        # a unique head keeps requests from sharing cached prefixes by accident
        head = [f"Request {i}:"]
        if a.name == "random":
            n_in, n_out = uniform(a.input_len), uniform(a.output_len)
            words = head + _words(rng, n_in - 2)
        elif a.name == "sharegpt-like":
            n_in, n_out = lognormal(a.input_len), lognormal(a.output_len)
            words = head + _words(rng, n_in - 2)
        else:  # prefix-repetition: one of the shared prefixes, then a unique question
            n_in, n_out = a.prefix_len + a.input_len, uniform(a.output_len)
            words = prefixes[i % len(prefixes)] + head + _words(rng, a.input_len - 2)
        out.append(BenchRequest(" ".join(words), n_in, n_out))
    return out


def arrival_delays(num: int, rate: float, seed: int) -> list[float]:
    """Start times (seconds from t0) of a Poisson process with ``rate`` arrivals per second."""
    if rate == float("inf"):
        return [0.0] * num
    rng = random.Random(seed + 1)
    t, out = 0.0, []
    for _ in range(num):
        out.append(t)
        t += rng.expovariate(rate)
    return out
