"""Beam search as an outer loop over the engine (vLLM's design): each step scores every live beam
with a one-token request asking for the top logprobs, then keeps the best continuations.

Every beam's request is its prompt plus the tokens chosen so far. It is added with ``retain_kv``
(its blocks stay when it finishes) and names the request that scored its parent beam as its
``kv_source``: it forks that request's block table (engine/scheduler/retained_kv.py), sharing every
block by reference count and copying the partial last block on its first write, so each step
computes one token per beam. The previous step's requests are released once their continuations
are queued. Where blocks cannot be kept (a data-parallel LLM's replicas share no cache; a source
dropped under memory pressure) a beam starts the ordinary way, from the prefix cache.

The selection is transformers' ``generate(num_beams=k, do_sample=False)`` step for step
(``GenerationMixin._beam_search``): the top ``max(2, 1 + #eos) * k`` continuations over all beams
by cumulative log-probability; a continuation that ends (an EOS, or the length limit) joins the
finished set only when it ranks in the first k, scored ``cum_logprob / generated_len **
length_penalty`` where ``generated_len`` counts the EOS token; the k best unfinished ones run on.
``early_stopping`` has transformers' meaning (False: stop when the best running beam, scored at
its current length, cannot beat the worst finished one; True: stop once k beams finished;
"never": with a positive length penalty, score the running beam at the longest length).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from engine.core.input_processor import InvalidInputError
from engine.outputs import Logprob
from engine.sampling_params import MAX_LOGPROBS, SamplingParams

if TYPE_CHECKING:
    from engine.entrypoints.llm import LLM

# each beam asks for the top 2 * width logprobs, and a request may ask for at most MAX_LOGPROBS
# (vLLM's max_logprobs): the widest beam search the engine can score exactly
MAX_BEAM_WIDTH = MAX_LOGPROBS // 2
_FINISHED_BLOCKED = -1.0e9


@dataclass
class BeamSearchParams:
    """vLLM's BeamSearchParams, plus transformers' ``early_stopping`` (default False, as there)."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    early_stopping: bool | str = False

    def validate(self, width_param: str = "beam_width") -> None:
        """Raises InvalidInputError naming the field (``width_param``: "n" on the server)."""
        w = self.beam_width
        if not isinstance(w, int) or isinstance(w, bool) or not 1 <= w <= MAX_BEAM_WIDTH:
            raise InvalidInputError(
                f"{width_param} (the beam width) must be an integer in [1, {MAX_BEAM_WIDTH}], got {w!r}: each beam "
                f"scores 2 * width candidates and at most {MAX_LOGPROBS} logprobs are returned per token",
                width_param,
            )
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise InvalidInputError(f"max_tokens must be a positive integer, got {self.max_tokens!r}", "max_tokens")
        if self.temperature not in (0, 0.0):
            raise InvalidInputError(
                "beam search ranks beams by the model's log-probabilities (as transformers does with "
                f"do_sample=False); temperature must be 0, got {self.temperature!r}", "temperature",
            )
        lp = self.length_penalty
        if not isinstance(lp, (int, float)) or isinstance(lp, bool) or not math.isfinite(lp):
            raise InvalidInputError(f"length_penalty must be a finite number, got {lp!r}", "length_penalty")
        if self.early_stopping not in (True, False, "never"):
            raise InvalidInputError(
                f"early_stopping must be true, false or 'never', got {self.early_stopping!r}", "early_stopping"
            )


@dataclass
class BeamSearchSequence:
    """One beam: ``tokens`` are the prompt's and the generated ones (an EOS only with
    include_stop_str_in_output); ``text`` the generated part decoded."""

    tokens: list[int]
    logprobs: list[dict[int, Logprob]]
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    score: float = 0.0  # cum_logprob / generated_len ** length_penalty, what the beams are ranked by


@dataclass
class BeamSearchOutput:
    sequences: list[BeamSearchSequence]  # best first, beam_width of them


@dataclass
class _Beam:
    tokens: list[int]  # generated so far
    cum_logprob: float
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    kv_source: str | None = None  # the request that computed prompt + tokens[:-1] (its blocks are forked)


@dataclass
class _Finished:
    score: float
    beam: _Beam
    eos: int | None  # the EOS token that ended it (None: the length limit)


class BeamSearchInstance:
    """The search state of one prompt; ``advance`` takes one step's top logprobs per live beam."""

    def __init__(self, prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: frozenset[int],
                 max_new_tokens: int) -> None:
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos = frozenset() if params.ignore_eos else eos_token_ids
        self.max_new_tokens = max_new_tokens
        self.width = params.beam_width
        self.num_candidates = max(2, 1 + len(eos_token_ids)) * self.width
        self.running = [_Beam([], 0.0)]
        self.finished: list[_Finished] = []
        self.gen_len = 0
        self.improvable = True  # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False

    def beam_prompts(self) -> list[list[int]]:
        return [self.prompt_token_ids + b.tokens for b in self.running]

    def beam_sources(self) -> list[str | None]:
        return [b.kv_source for b in self.running]

    def advance(self, top: list[dict[int, Logprob]], scored_by: list[str]) -> None:
        """``top[b]``: token -> logprob of beam b's best ``num_candidates`` next tokens (at least);
        ``scored_by[b]``: the request that scored beam b (its continuations fork its blocks)."""
        p, width = self.params, self.width
        cands = [(b.cum_logprob + lp.logprob, i, tok, lp) for i, (b, entry) in enumerate(zip(self.running, top))
                 for tok, lp in entry.items()]
        cands.sort(key=lambda c: -c[0])
        cands = cands[: self.num_candidates]
        at_limit = self.gen_len + 1 >= self.max_new_tokens
        hits = [at_limit or c[2] in self.eos for c in cands]
        new_beams = []
        for (score, i, tok, lp), hit in zip(cands, hits):
            parent = self.running[i]
            new_beams.append(_Beam(parent.tokens + [tok], score, parent.logprobs + [{tok: lp}], scored_by[i]))
        # the k best continuations that did not end run on (ended ones sink to the bottom)
        order = sorted(range(len(cands)), key=lambda j: -(cands[j][0] + (_FINISHED_BLOCKED if hits[j] else 0.0)))
        # (an ended one runs on only when more than k ended, with transformers' sunk score)
        next_running = [_Beam(new_beams[j].tokens, new_beams[j].cum_logprob + _FINISHED_BLOCKED, new_beams[j].logprobs,
                              new_beams[j].kv_source)
                        if hits[j] else new_beams[j] for j in order[:width]]
        best_running = cands[order[0]][0] + (_FINISHED_BLOCKED if hits[order[0]] else 0.0)
        # ended continuations among the first k join the finished set, unless it is closed
        closed = not self.improvable or (p.early_stopping is True and len(self.finished) >= width)
        if not closed:
            norm = (self.gen_len + 1) ** p.length_penalty
            for j in range(min(width, len(cands))):
                if hits[j]:
                    tok = cands[j][2]
                    self.finished.append(_Finished(cands[j][0] / norm, new_beams[j], tok if tok in self.eos else None))
            self.finished.sort(key=lambda f: -f.score)
            del self.finished[width:]
        self.running = next_running
        self.gen_len += 1
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            best_len = self.max_new_tokens
        else:
            best_len = self.gen_len
        full = len(self.finished) >= width
        self.improvable = self.improvable and (
            not full or best_running / (best_len ** p.length_penalty) > self.finished[-1].score
        )
        self.done = not self.improvable or (p.early_stopping is True and full) or all(hits)

    def output(self, tokenizer: Any) -> BeamSearchOutput:
        seqs = []
        for f in self.finished:
            gen = list(f.beam.tokens)
            logprobs = list(f.beam.logprobs)
            if f.eos is not None and not self.params.include_stop_str_in_output:
                gen, logprobs = gen[:-1], logprobs[:-1]
            seqs.append(BeamSearchSequence(
                tokens=self.prompt_token_ids + gen, logprobs=logprobs, cum_logprob=f.beam.cum_logprob,
                text=tokenizer.decode(gen, skip_special_tokens=True),
                finish_reason="stop" if f.eos is not None else "length", stop_reason=None, score=f.score,
            ))
        return BeamSearchOutput(seqs)


def step_inputs(input_processor: Any, live: list[BeamSearchInstance]) -> list[tuple[BeamSearchInstance, Any]]:
    """Each live beam's scoring request as a ProcessedInput that forks its parent's blocks and
    keeps its own for its continuations."""
    asks = []
    for inst in live:
        for ids, source in zip(inst.beam_prompts(), inst.beam_sources()):
            processed = input_processor.process({"prompt_token_ids": ids}, step_params(inst))
            asks.append((inst, replace(processed, kv_source=source, retain_kv=True)))
    return asks


def advance_all(live: list[BeamSearchInstance], asks: list[tuple[BeamSearchInstance, Any]], outs: list) -> None:
    """One step's outputs (``outs[i]`` answers ``asks[i]``) into every live instance: each beam's
    top logprobs, and the request that scored it (whose blocks its continuations fork)."""
    tops: dict[int, list] = {id(inst): [] for inst in live}
    scored_by: dict[int, list] = {id(inst): [] for inst in live}
    for (inst, _), out in zip(asks, outs):
        tops[id(inst)].append(out.outputs[0].logprobs[0])
        scored_by[id(inst)].append(out.request_id)
    for inst in live:
        inst.advance(tops[id(inst)], scored_by[id(inst)])


def step_params(instance: BeamSearchInstance) -> SamplingParams:
    """One scoring step of a beam: one greedy token, the top candidates' raw logprobs."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=instance.num_candidates, ignore_eos=True,
                          detokenize=False)


def make_instances(prompt_ids: list[list[int]], params: BeamSearchParams, eos_token_ids: frozenset[int],
                   max_model_len: int) -> list[BeamSearchInstance]:
    params.validate()
    if max(2, 1 + len(eos_token_ids)) * params.beam_width > MAX_LOGPROBS:
        raise InvalidInputError(
            f"beam_width={params.beam_width} needs {max(2, 1 + len(eos_token_ids)) * params.beam_width} logprobs per "
            f"beam with this model's {len(eos_token_ids)} EOS tokens; at most {MAX_LOGPROBS}: lower it", "beam_width",
        )
    return [BeamSearchInstance(ids, params, eos_token_ids, min(params.max_tokens, max_model_len - len(ids)))
            for ids in prompt_ids]


def run_beam_search(llm: LLM, prompts: list, params: BeamSearchParams) -> list[BeamSearchOutput]:
    """The offline loop: every live beam of every prompt is one request of the same engine step."""
    engine = llm.llm_engine
    if not prompts:
        raise InvalidInputError("prompts is empty: give at least one prompt", "prompts")
    ids = [engine.tokenize_prompt(p)[1] for p in prompts]
    for p_ids in ids:
        engine.check_prompt(len(p_ids))
    instances = make_instances(ids, params, engine.eos_token_ids, engine.max_model_len)
    # a data-parallel LLM's replicas share no KV: there every step re-reads the prefix cache
    forks = hasattr(engine, "release_kv")
    kept: list[str] = []  # the previous step's requests, whose blocks their continuations fork
    try:
        while True:
            live = [inst for inst in instances if not inst.done and inst.max_new_tokens > 0]
            if not live:
                break
            if forks:
                asks = step_inputs(engine.input_processor, live)
                outs = llm._generate_processed([a[1] for a in asks], before_run=lambda: engine.release_kv(kept))
            else:
                asks = [(inst, beam_ids) for inst in live for beam_ids in inst.beam_prompts()]
                outs = llm.generate([a[1] for a in asks], [step_params(a[0]) for a in asks], use_tqdm=False)
            kept = [out.request_id for out in outs] if forks else []
            advance_all(live, asks, outs)
    finally:
        if kept:
            engine.release_kv(kept)
    return [inst.output(engine.tokenizer) for inst in instances]
