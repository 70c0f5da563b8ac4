"""Seeded synthetic workloads with vLLM's dataset names: ``random``, ``sharegpt-like`` and
``prefix-repetition``. Prompts are text (common English words, about one token each for BPE
tokenizers), so every peer (the engine, transformers, vLLM, llama.cpp, a server) gets the same
input; each request has an exact output length (the runs use ``ignore_eos``)."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

DATASETS = ("random", "sharegpt-like", "prefix-repetition")

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
    prompt: str
    input_words: int
    output_len: int


@dataclass
class DatasetArgs:
    name: str = "random"
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 64
    range_ratio: float = 0.5  # random: lengths uniform in mean * (1 +- ratio)
    prefix_len: int = 256  # prefix-repetition: words shared by the prompts of one prefix
    num_prefixes: int = 4
    seed: int = 0


def _words(rng: random.Random, n: int) -> list[str]:
    return [rng.choice(_WORDS) for _ in range(max(n, 1))]


def make_dataset(a: DatasetArgs) -> list[BenchRequest]:
    if a.name not in DATASETS:
        raise ValueError(f"--dataset-name {a.name!r} is not one of {', '.join(DATASETS)}")
    if a.num_prompts < 1 or a.input_len < 1 or a.output_len < 1 or not 0 <= a.range_ratio < 1:
        raise ValueError("need --num-prompts, --input-len, --output-len >= 1 and 0 <= --range-ratio < 1")
    rng = random.Random(a.seed)

    def uniform(mean: int) -> int:
        return rng.randint(max(1, int(mean * (1 - a.range_ratio))), max(1, int(mean * (1 + a.range_ratio))))

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
