"""Structured outputs offline, on the real SmolLM2 weights: every constraint kind yields valid output,
greedy output is unchanged by batching and equal to transformers + xgrammar's own logits processor,
and bad constraints are typed errors (engine/structured_output/, docs/structured_outputs.md)."""
from __future__ import annotations

import ast
import json
import re

import pytest

from engine import LLM, SamplingParams
from engine.structured_output import InvalidGrammarError, StructuredOutputsParams as SO
from tests.conftest import assert_greedy_match
from tests.test_structured_output_schemas import SCHEMAS, validate

pytestmark = pytest.mark.slow

MAX_TOKENS = 120
ARITH = r"""root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= [0-9]{1,3} | "(" expr ")"
"""


@pytest.fixture(scope="module")
def llm(default_model_path):
    llm = LLM(max_model_len=1024, num_gpu_blocks_override=512)
    yield llm
    llm.shutdown()


def chat(llm: LLM, question: str) -> str:
    return llm.llm_engine.tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                         add_generation_prompt=True)


def greedy(so: SO, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=kw.pop("max_tokens", MAX_TOKENS), structured_outputs=so, **kw)


def assert_clean(llm: LLM) -> None:
    llm.llm_engine.kv_cache.check_invariants()
    st = llm.get_stats()
    assert st.kv_cache.kv_blocks_used == 0 and st.num_running == 0 and st.num_waiting == 0, st


def test_json_schemas_batched_all_validate(llm):
    names = sorted(SCHEMAS)
    assert len(names) >= 20
    prompts = [chat(llm, f"Reply with a JSON value for the schema named {n}.") for n in names]
    params = [greedy(SO(json=SCHEMAS[n], disable_any_whitespace=True)) for n in names]
    outs = llm.generate(prompts, params, use_tqdm=False)
    for n, out in zip(names, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop", (n, o.text)
        validate(SCHEMAS[n], o.text)
    # batching does not change a greedy constrained output
    i = names.index("enum_string")
    alone = llm.generate(prompts[i], params[i], use_tqdm=False)[0].outputs[0]
    assert alone.token_ids == outs[i].outputs[0].token_ids
    st = llm.get_stats().structured_output
    assert st.requests_json >= len(names) and st.compile_seconds_count >= len(names)
    assert st.grammar_cache_hits >= 1  # the unbatched rerun found its grammar compiled
    assert_clean(llm)


def test_json_with_free_whitespace_and_pydantic_model(llm):
    from pydantic import BaseModel

    class City(BaseModel):
        name: str
        population: int

    out = llm.generate(chat(llm, "Give me a city as JSON."), greedy(SO(json=City), max_tokens=80), use_tqdm=False)[0]
    o = out.outputs[0]
    if o.finish_reason == "stop":  # free whitespace may run to max_tokens on a small model
        City.model_validate_json(o.text)
    else:
        assert o.finish_reason == "length"
    obj = llm.generate(chat(llm, "Describe Paris as JSON."), greedy(SO(json_object=True, disable_any_whitespace=True)),
                       use_tqdm=False)[0].outputs[0]
    assert obj.finish_reason == "stop" and isinstance(json.loads(obj.text), dict)


def test_regex_choice_grammar(llm):
    cases = [
        (SO(regex=r"\d{3}-\d{4}"), "Give me a phone number.", lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        (SO(regex=r"(yes|no), because [a-z ]{1,30}\."), "Is the sky blue?",
         lambda t: re.fullmatch(r"(yes|no), because [a-z ]{1,30}\.", t)),
        (SO(choice=["positive", "negative", "neutral"]), "Sentiment of 'I love it'?",
         lambda t: t in ("positive", "negative", "neutral")),
        (SO(grammar=ARITH), "Write an arithmetic expression.", _is_arithmetic),
    ]
    outs = llm.generate([chat(llm, q) for _, q, _ in cases], [greedy(so, max_tokens=40) for so, _, _ in cases],
                        use_tqdm=False)
    for (so, _, check), out in zip(cases, outs):
        o = out.outputs[0]
        assert o.finish_reason == "stop" and check(o.text), (so.kind, o.text)
    assert_clean(llm)


def _is_arithmetic(text: str) -> bool:
    """The reference parser: Python's own, limited to integers, + - * / and parentheses."""
    tree = ast.parse(text, mode="eval")
    allowed = (ast.Expression, ast.BinOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.Div)
    return all(isinstance(n, allowed) for n in ast.walk(tree)) and all(
        isinstance(n.value, int) for n in ast.walk(tree) if isinstance(n, ast.Constant))


def test_sampling_options_compose(llm):
    schema = SCHEMAS["enum_string"]
    prompt = chat(llm, "List some tags as JSON.")
    # n = 4 random samples: a matcher per sample, every one valid
    outs = llm.generate(prompt, SamplingParams(n=4, temperature=0.8, seed=3, max_tokens=MAX_TOKENS,
                                               structured_outputs=SO(json=SCHEMAS["array_min_max"],
                                                                     disable_any_whitespace=True)),
                        use_tqdm=False)[0].outputs
    assert len(outs) == 4
    for o in outs:
        assert o.finish_reason == "stop"
        validate(SCHEMAS["array_min_max"], o.text)
    # max_tokens cuts the JSON short: finish_reason "length"
    cut = llm.generate(prompt, greedy(SO(json=schema), max_tokens=3), use_tqdm=False)[0].outputs[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 3
    # a stop string inside the constrained output ends it there
    full = llm.generate(prompt, greedy(SO(json=schema, disable_any_whitespace=True)), use_tqdm=False)[0].outputs[0]
    stop = full.text[4:7]
    stopped = llm.generate(prompt, greedy(SO(json=schema, disable_any_whitespace=True), stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.finish_reason == "stop" and stopped.text == full.text[: full.text.index(stop)]
    # min_tokens: EOS is held back until then, but never past the grammar's end
    choice = llm.generate(prompt, greedy(SO(choice=["ok"]), min_tokens=5), use_tqdm=False)[0].outputs[0]
    assert choice.text == "ok" and choice.finish_reason == "stop"
    # logprobs are those of the masked distribution: every reported top token is allowed
    lp = llm.generate(prompt, greedy(SO(choice=["yes", "no"]), logprobs=3), use_tqdm=False)[0].outputs[0]
    first = lp.logprobs[0]
    assert max(v.logprob for v in first.values()) > -1e-3 or len([v for v in first.values() if v.logprob > -1e9]) <= 3
    assert_clean(llm)


def test_prefix_caching_and_preemption_keep_greedy_output(llm):
    schema = SCHEMAS["nested_object"]
    prompt = chat(llm, "Give me a user as JSON, " + "with an id and a name, " * 4)
    params = greedy(SO(json=schema, disable_any_whitespace=True))
    ref = llm.generate(prompt, params, use_tqdm=False)[0]
    again = llm.generate(prompt, params, use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == ref.outputs[0].token_ids
    engine = llm.llm_engine  # preempted (recompute) mid-output: the matcher stays with the request
    engine.add_request("p", prompt, params)
    for _ in range(8):
        engine.step()
    assert engine.scheduler.preempt_request("p")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finished and outs[-1].outputs[0].token_ids == ref.outputs[0].token_ids
    assert engine.scheduler.stats.num_preemptions > 0
    assert_clean(llm)


@pytest.mark.parametrize("bad, match", [
    (dict(json={"type": "objekt"}), "objekt"),
    (dict(json="{not json"), "not valid JSON"),
    (dict(regex="(abc"), "parenthes"),
    (dict(grammar="root ::= undefined_rule"), "undefined_rule"),
    (dict(choice=[]), "non-empty"),
    (dict(json={"type": "object"}, regex="a+"), "both 'json' and 'regex'"),
    (dict(grammar="root ::= [^\\x00-\\U0010FFFF]"), "no token can start it"),  # parses, accepts nothing
])
def test_bad_constraints_are_typed_errors(llm, bad, match):
    with pytest.raises(InvalidGrammarError, match=match) as e:
        llm.generate("x", SamplingParams(max_tokens=2, structured_outputs=SO(**bad)), use_tqdm=False)
    assert e.value.param.startswith("structured_outputs")
    assert_clean(llm)


def test_greedy_matches_transformers_with_xgrammar_processor(llm, default_model_path):
    import torch
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=model.config.vocab_size,
                                              stop_token_ids=sorted(llm.llm_engine.eos_token_ids))
    compiler = xgr.GrammarCompiler(info)
    for name in ("nested_object",):
        schema = SCHEMAS[name]
        prompt = chat(llm, f"Reply with JSON for {name}.")
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        proc = xgr.contrib.hf.LogitsProcessor(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
        with torch.inference_mode():
            ref = model.generate(ids, max_new_tokens=60, do_sample=False, logits_processor=[proc],
                                 eos_token_id=sorted(llm.llm_engine.eos_token_ids), pad_token_id=tok.eos_token_id,
                                 return_dict_in_generate=True, output_scores=True)
        ref_tokens = ref.sequences[0, ids.shape[1]:].tolist()
        gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in ref.scores]
        got = llm.generate({"prompt_token_ids": ids[0].tolist()},
                           greedy(SO(json=schema, disable_any_whitespace=True), max_tokens=60), use_tqdm=False)[0]
        assert_greedy_match(list(got.outputs[0].token_ids), {"tokens": ref_tokens, "gaps": gaps}, label=name)
