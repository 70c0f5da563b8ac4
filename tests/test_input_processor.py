"""InputProcessor: the one place prompts are tokenized and requests checked, offline and for the server."""
from __future__ import annotations

import pytest

from engine import LLM, SamplingParams
from engine.core.input_processor import InputProcessor, InvalidInputError, ProcessedInput
from engine.errors import PromptTooLongError

VOCAB = 100


class _Tokenizer:
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % VOCAB for c in text]


def _check_prompt(n: int) -> None:
    if n > 8:
        raise PromptTooLongError(f"the prompt has {n} tokens, more than max_model_len=8")


@pytest.fixture
def processor() -> InputProcessor:
    return InputProcessor(_Tokenizer(), VOCAB, frozenset({2}), _check_prompt)


@pytest.mark.parametrize(
    "prompt,param",
    [
        ([1, 2, VOCAB], "prompt"),
        ([-1], "prompt"),
        ([1, True], "prompt"),
        ({"prompt_token_ids": [3, 10**9]}, "prompt_token_ids"),
        ({"text": "no ids"}, "prompt"),
    ],
)
def test_bad_prompts_name_the_field(processor, prompt, param):
    with pytest.raises(InvalidInputError) as e:
        processor.process(prompt)
    assert e.value.param == param
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        (dict(stop_token_ids=[VOCAB]), "stop_token_ids"),
        (dict(allowed_token_ids=[5, VOCAB + 3]), "allowed_token_ids"),
        (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
        (dict(logprobs=21), "logprobs"),
        (dict(prompt_logprobs=-1), "prompt_logprobs"),  # -1: the whole vocabulary, over the cap
    ],
)
def test_bad_params_name_the_field(processor, kwargs, param):
    with pytest.raises(InvalidInputError, match=param) as e:
        processor.process([1, 2], SamplingParams(**kwargs))
    assert e.value.param == param


def test_params_mutated_after_construction_are_validated(processor):
    params = SamplingParams()
    params.top_p = 2.0
    with pytest.raises(InvalidInputError) as e:
        processor.process([1], params)
    assert e.value.param == "top_p"


def test_prompt_length_goes_through_the_schedulers_check(processor):
    with pytest.raises(PromptTooLongError):
        processor.process(list(range(9)))


def test_process_fills_in_a_copy(processor):
    params = SamplingParams(stop_token_ids=[7], max_tokens=3)
    out = processor.process("hi", params)
    assert isinstance(out, ProcessedInput)
    assert out.prompt == "hi" and out.prompt_token_ids == [ord("h") % VOCAB, ord("i") % VOCAB]
    assert out.params is not params and out.params.all_stop_token_ids == {7, 2}  # EOS joined the copy
    assert params.all_stop_token_ids == {7}  # the caller's params are untouched
    ids = processor.process({"prompt": "x", "prompt_token_ids": [4, 5]})
    assert (ids.prompt, ids.prompt_token_ids) == ("x", [4, 5])


def test_with_tokenizer_keeps_the_limits(processor):
    other = processor.with_tokenizer(_Tokenizer())
    assert other.tokenizer is not processor.tokenizer
    assert (other.vocab_size, other.eos_token_ids, other.check_prompt) == (VOCAB, frozenset({2}), _check_prompt)


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=32, max_model_len=128)
    yield llm
    llm.shutdown()


def test_offline_rejects_bad_ids_with_the_param_named(llm):
    vocab = llm.llm_engine.config.model.vocab_size
    cases = [
        (lambda: llm.generate([1, vocab], use_tqdm=False), "prompt"),
        (lambda: llm.generate({"prompt_token_ids": [vocab + 5]}, use_tqdm=False), "prompt_token_ids"),
        (lambda: llm.generate("hi", SamplingParams(stop_token_ids=[vocab]), use_tqdm=False), "stop_token_ids"),
        (lambda: llm.generate("hi", SamplingParams(logit_bias={vocab: 2.0}), use_tqdm=False), "logit_bias"),
    ]
    for call, param in cases:
        with pytest.raises(InvalidInputError) as e:
            call()
        assert e.value.param == param
    assert llm.get_stats().num_waiting == 0
    assert llm.llm_engine.kv_cache.num_free_blocks == llm.llm_engine.kv_cache.num_blocks


def test_engine_queues_a_processed_input_as_is(llm):
    engine = llm.llm_engine
    processed = engine.input_processor.process({"prompt_token_ids": [5, 6, 7]},
                                               SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    with pytest.raises(TypeError):
        engine.add_request("p0", processed, SamplingParams())
    engine.add_request("p1", processed)
    final = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final = out
    assert final is not None and final.request_id == "p1" and len(final.outputs[0].token_ids) == 4
    same = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                        use_tqdm=False)[0]
    assert final.outputs[0].token_ids == same.outputs[0].token_ids


def test_n_fans_out_into_seeded_children(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=4, ignore_eos=True)
    fanned = llm.generate({"prompt_token_ids": [9, 8, 7]}, params, use_tqdm=False)[0]
    assert [c.index for c in fanned.outputs] == [0, 1, 2]
    for i, c in enumerate(fanned.outputs):
        alone = llm.generate({"prompt_token_ids": [9, 8, 7]},
                             SamplingParams(temperature=1.0, seed=5 + i, max_tokens=4, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
        assert c.token_ids == alone.token_ids
