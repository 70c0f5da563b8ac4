"""LLM.beam_search equals transformers' generate(num_beams=k, do_sample=False) token for token on
SmolLM2, for every beam it returns: batched, under KV-cache pressure (preemption), every block back."""
from __future__ import annotations

import pytest
import torch

from engine.core.input_processor import InvalidInputError
from engine.entrypoints.beam_search import MAX_BEAM_WIDTH, BeamSearchOutput, BeamSearchParams
from engine.entrypoints.llm import LLM
from engine.errors import PromptTooLongError
from engine.sampling_params import SamplingParams
from tests.golden_prompts import golden_prompt_ids

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def llm(default_model_path):
    llm = LLM(None, max_model_len=2048, num_gpu_blocks_override=512)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def prompt_ids(llm) -> list[list[int]]:
    return golden_prompt_ids(llm.get_tokenizer())


@pytest.fixture(scope="module")
def hf_model(default_model_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


def hf_beams(model, ids: list[int], width: int, max_new: int, length_penalty: float,
             early_stopping: bool | str = False, eos: list[int] | None = None) -> tuple[list[list[int]], list[float]]:
    """transformers' beams (best first), each cut before its first EOS, and their scores."""
    eos = eos or [model.generation_config.eos_token_id]
    with torch.inference_mode():
        g = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), num_beams=width,
            num_return_sequences=width, do_sample=False, max_new_tokens=max_new, length_penalty=length_penalty,
            early_stopping=early_stopping, pad_token_id=2, eos_token_id=eos, output_scores=True,
            return_dict_in_generate=True,
        )
    beams = []
    for row in g.sequences:
        gen = row[len(ids):].tolist()
        cut = [gen.index(e) for e in eos if e in gen]
        beams.append(gen[: min(cut)] if cut else gen)
    return beams, g.sequences_scores.tolist()


def assert_beams_match(model, ids_list, outs: list[BeamSearchOutput], params: BeamSearchParams) -> None:
    for i, (ids, out) in enumerate(zip(ids_list, outs)):
        ref, scores = hf_beams(model, ids, params.beam_width, params.max_tokens, params.length_penalty,
                               params.early_stopping)
        got = [s.tokens[len(ids):] for s in out.sequences]
        assert all(s.tokens[: len(ids)] == ids for s in out.sequences)
        assert got == ref, f"prompt {i}, width {params.beam_width}: got {got}, transformers {ref}"
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=2e-3)


def assert_all_blocks_free(llm: LLM) -> None:
    kv = llm.llm_engine.kv_cache
    assert kv.num_free_blocks == kv.num_blocks
    kv.check_invariants()


@pytest.mark.parametrize("width", [2, 4])
def test_golden_prompts_batched_equal_transformers(llm, prompt_ids, hf_model, width):
    params = BeamSearchParams(beam_width=width, max_tokens=MAX_TOKENS, length_penalty=1.0)
    outs = llm.beam_search([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    assert len(outs) == len(prompt_ids) and all(len(o.sequences) == width for o in outs)
    assert_beams_match(hf_model, prompt_ids, outs, params)
    tok = llm.get_tokenizer()
    for ids, out in zip(prompt_ids, outs):
        best = out.sequences[0]
        assert best.text == tok.decode(best.tokens[len(ids):], skip_special_tokens=True)
        assert best.cum_logprob == pytest.approx(sum(next(iter(d.values())).logprob for d in best.logprobs), abs=1e-4)
    assert_all_blocks_free(llm)


def test_beams_fork_their_parents_blocks(llm, prompt_ids):
    """After the first step every beam forks the block table of the request that scored its parent
    (copy-on-write of the partial last block): each step computes one token per beam."""
    ids = prompt_ids[5]  # 284 tokens: 17 full blocks and a partial one
    sched, kv = llm.llm_engine.scheduler.stats, llm.get_stats().kv_cache
    before = (sched.num_forked_beams, sched.num_prefill_tokens + sched.num_decode_tokens, kv.prefix_cache_hits,
              kv.cow_copies)
    llm.beam_search([ids], BeamSearchParams(beam_width=4, max_tokens=3, ignore_eos=True))
    kv = llm.get_stats().kv_cache
    forked = sched.num_forked_beams - before[0]
    computed = sched.num_prefill_tokens + sched.num_decode_tokens - before[1]
    hits = kv.prefix_cache_hits - before[2]
    assert forked == 2 * 4  # steps 2 and 3: four beams each
    assert computed == len(ids) - hits + 2 * 4  # the prompt once (less its cached blocks), then a token a beam
    assert kv.cow_copies - before[3] == 2 * 4  # every beam copied its parent's partial block
    assert_all_blocks_free(llm)


@pytest.mark.parametrize(("length_penalty", "early_stopping"), [(0.0, False), (2.0, False), (-1.0, True),
                                                               (1.0, "never")])
def test_length_penalty_and_early_stopping(llm, prompt_ids, hf_model, length_penalty, early_stopping):
    params = BeamSearchParams(beam_width=3, max_tokens=12, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    subset = [prompt_ids[i] for i in (0, 3, 7)]
    outs = llm.beam_search([{"prompt_token_ids": ids} for ids in subset], params)
    assert_beams_match(hf_model, subset, outs, params)
    assert_all_blocks_free(llm)


def test_eos_ends_beams(tmp_path, default_model_path, prompt_ids):
    """Beams that end early: a tiny model whose EOS ids are [a token it likes to emit, 2], so
    beams finish at different lengths. Ended beams are scored with the EOS counted, as in
    transformers (which also keeps 3 * width candidates with two EOS ids), and carry
    finish_reason "stop" without the EOS token."""
    import json

    from transformers import AutoModelForCausalLM

    from tests.conftest import make_tiny_llama

    path = make_tiny_llama(tmp_path / "eos", default_model_path, seed=1)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = prompt_ids[3]
    with torch.inference_mode():
        greedy = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=4, eos_token_id=None)[0]
    eos = int(greedy[len(ids) + 1])  # the second greedy token ends a sequence
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((path / name).read_text())
        cfg["eos_token_id"] = [eos, 2]
        (path / name).write_text(json.dumps(cfg))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(str(path), num_gpu_blocks_override=128)
    assert llm.llm_engine.eos_token_ids == {eos, 2}
    params = BeamSearchParams(beam_width=3, max_tokens=10)
    outs = llm.beam_search([ids, prompt_ids[0]], params)
    for i, (p_ids, out) in enumerate(zip([ids, prompt_ids[0]], outs)):
        ref, scores = hf_beams(model, p_ids, 3, 10, 1.0, False, eos=[eos, 2])
        assert [s.tokens[len(p_ids):] for s in out.sequences] == ref, i
        assert [s.score for s in out.sequences] == pytest.approx(scores, abs=2e-3)
    assert any(s.finish_reason == "stop" for s in outs[0].sequences), outs[0].sequences
    for out in outs:
        for s in out.sequences:
            assert eos not in s.tokens[len(ids):] or s.finish_reason == "length"
    with_eos = llm.beam_search([ids], BeamSearchParams(beam_width=3, max_tokens=10, include_stop_str_in_output=True))
    for s, plain in zip(with_eos[0].sequences, outs[0].sequences):
        assert s.tokens == plain.tokens + ([eos] if plain.finish_reason == "stop" else [])
    assert_all_blocks_free(llm)
    llm.shutdown()


def test_preemption_small_cache(default_model_path, prompt_ids, hf_model):
    """A cache too small for everything in flight: the beams' one-token requests share the engine
    with long generations whose decode growth preempts requests (beams included); the beams are
    unchanged and every block comes back."""
    small = LLM(None, max_model_len=2048, num_gpu_blocks_override=40, max_num_batched_tokens=128)
    subset = [prompt_ids[i] for i in (5, 9, 7, 8)]  # 284, 156, 39 and 28 tokens
    params = BeamSearchParams(beam_width=4, max_tokens=6)
    for j in range(8):  # finished by the same engine loop that runs the beams' steps
        small.llm_engine.add_request(f"background-{j}", {"prompt_token_ids": prompt_ids[j % 5]},
                                     SamplingParams(max_tokens=80, ignore_eos=True, temperature=0.0))
    outs = small.beam_search([{"prompt_token_ids": ids} for ids in subset], params)
    assert small.get_stats().scheduler.num_preemptions > 0
    assert not small.llm_engine.has_unfinished_requests()
    assert_beams_match(hf_model, subset, outs, params)
    assert_all_blocks_free(small)
    small.shutdown()


def test_bad_params(llm):
    for kw, field in [
        ({"beam_width": 0}, "beam_width"),
        ({"beam_width": MAX_BEAM_WIDTH + 1}, "beam_width"),
        ({"beam_width": 2, "max_tokens": 0}, "max_tokens"),
        ({"beam_width": 2, "temperature": 0.7}, "temperature"),
        ({"beam_width": 2, "early_stopping": "sometimes"}, "early_stopping"),
        ({"beam_width": 2, "length_penalty": float("nan")}, "length_penalty"),
    ]:
        args = {"max_tokens": 4, **kw}
        with pytest.raises(InvalidInputError) as e:
            llm.beam_search(["hello"], BeamSearchParams(**args))
        assert e.value.param == field, kw
    with pytest.raises(InvalidInputError, match="empty"):
        llm.beam_search([], BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(PromptTooLongError):
        llm.beam_search([[5] * 2100], BeamSearchParams(beam_width=2, max_tokens=4))
    assert_all_blocks_free(llm)
