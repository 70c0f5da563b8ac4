"""Structured outputs in the engine's machinery, on a tiny random model: compiles off the step (a
compiling request waits without holding others), failures, timeouts and aborts free every block,
and greedy constrained output is unchanged by speculative decoding, preemption (recompute and
swap) and batching."""
from __future__ import annotations

import json
import threading
import time

import pytest

from engine import LLM, SamplingParams
from engine.structured_output import InvalidGrammarError, StructuredOutputsParams as SO

ARRAY = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 12}


def params(so: SO, max_tokens: int = 40, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=so, **kw)


def prompts(n: int) -> list[dict]:
    return [{"prompt_token_ids": [100 + 13 * i + j for j in range(5 + 3 * i)]} for i in range(n)]


def clean(llm: LLM) -> None:
    llm.llm_engine.kv_cache.check_invariants()
    st = llm.get_stats()
    assert st.kv_cache.kv_blocks_used == 0 and st.num_running == 0 and st.num_waiting == 0, st


@pytest.fixture(scope="module")
def llm(tiny_model_path):
    llm = LLM(str(tiny_model_path), num_gpu_blocks_override=128)
    yield llm
    llm.shutdown()


def slow_compile(llm: LLM, seconds: float, fail: bool = False):
    """Makes the backend's compile of regexes starting with "slow" sleep (and optionally fail)."""
    backend = llm.llm_engine.structured_output.backend
    real = backend.compile
    release = threading.Event()

    def compile(p):
        if p.kind == "regex" and p.regex.startswith("slow"):
            release.wait(seconds)
            if fail:
                raise InvalidGrammarError("structured_outputs regex is invalid: injected failure", p.param)
        return real(p)

    backend.compile = compile
    return release, lambda: setattr(backend, "compile", real)


def test_compiling_request_waits_without_holding_others(llm):
    release, undo = slow_compile(llm, 5.0)
    try:
        eng = llm.llm_engine
        eng.add_request("slow", prompts(1)[0], params(SO(regex="slow[0-9]{3}")))
        eng.add_request("plain", prompts(2)[1], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        done = {}
        for _ in range(10):
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
        assert "plain" in done and "slow" not in done  # the plain request finished while the grammar compiled
        assert eng.scheduler.requests["slow"].status.name == "WAITING_FOR_FSM"
        release.set()
        while eng.has_unfinished_requests():
            for out in eng.step():
                done[out.request_id] = out
        text = done["slow"].outputs[0].text
        assert done["slow"].outputs[0].finish_reason == "stop" and text.startswith("slow") and len(text) == 7
    finally:
        undo()
    clean(llm)


def test_compile_failure_and_timeout_end_the_request_and_free_blocks(llm):
    release, undo = slow_compile(llm, 5.0, fail=True)
    try:
        release.set()  # fails at once, after the request is queued
        out = llm.generate(prompts(1)[0], params(SO(regex="slow-fail")), use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "error" and "injected failure" in out.stop_reason
    finally:
        undo()
    release, undo = slow_compile(llm, 3.0)
    config = llm.llm_engine.structured_output.config
    config.compile_timeout_s = 0.5
    try:
        start = time.monotonic()
        outs = llm.generate(prompts(2), [params(SO(regex="slow-timeout")), params(SO(regex="[a-c]{4}"))],
                            use_tqdm=False)
        assert time.monotonic() - start < 2.5  # 0.5 s limit: the request failed instead of waiting out the compile
        assert outs[0].outputs[0].finish_reason == "error" and "longer than 0.5 s" in outs[0].outputs[0].stop_reason
        assert outs[1].outputs[0].finish_reason == "stop" and len(outs[1].outputs[0].text) == 4
    finally:
        config.compile_timeout_s = 10.0
        release.set()
        undo()
    st = llm.get_stats().structured_output
    assert st.compile_timeouts >= 1 and st.compile_failures >= 2
    clean(llm)


def test_abort_while_compiling_frees_everything(llm):
    release, undo = slow_compile(llm, 5.0)
    try:
        eng = llm.llm_engine
        eng.add_request("a", prompts(1)[0], params(SO(regex="slow-abort")))
        eng.step()
        out = eng.abort_request("a")[0]
        assert out.finished and out.outputs[0].finish_reason == "abort"
    finally:
        release.set()
        undo()
    clean(llm)


def test_bad_constraint_is_a_typed_error_before_queuing(llm):
    with pytest.raises(InvalidGrammarError, match="regex") as e:
        llm.llm_engine.add_request("bad", prompts(1)[0], params(SO(regex="[z-a]")))
    assert e.value.param == "structured_outputs.regex"
    clean(llm)


def _run(llm: LLM, sos: list[SO], max_tokens: int = 40, first: int = 0) -> list[list[int]]:
    ps = prompts(first + len(sos))[first:]
    outs = llm.generate(ps, [params(so, max_tokens) for so in sos], use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


CONSTRAINTS = [SO(json=ARRAY, disable_any_whitespace=True), SO(regex=r"(ab|cd){2,12}"),
               SO(choice=["left", "right", "up"]), SO(json_object=True, disable_any_whitespace=True),
               SO(json=ARRAY, disable_any_whitespace=True)]


def test_batched_equals_one_at_a_time_and_outputs_are_valid(llm):
    alone = [_run(llm, [so], first=i)[0] for i, so in enumerate(CONSTRAINTS)]
    assert _run(llm, CONSTRAINTS) == alone
    tok = llm.llm_engine.tokenizer
    texts = [tok.decode(t, skip_special_tokens=True) for t in alone]
    assert len(json.loads(texts[0])) <= 12 and texts[2] in ("left", "right", "up")
    clean(llm)


@pytest.mark.parametrize("setting", [
    dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                             "prompt_lookup_max": 3}),
    dict(),  # preemption by recompute
    dict(preemption_mode="swap", swap_space=0.01),
], ids=["ngram", "recompute", "swap"])
def test_greedy_unchanged_by_spec_decode_and_preemption(llm, tiny_model_path, setting):
    ref = _run(llm, CONSTRAINTS)
    other = LLM(str(tiny_model_path), num_gpu_blocks_override=128, **setting)
    try:
        if "speculative_config" in setting:
            assert _run(other, CONSTRAINTS) == ref
            assert other.get_stats().spec_decoding.num_draft_tokens > 0
        else:  # every request is preempted once it has 2 output tokens, its matcher kept
            eng, got, done = other.llm_engine, {}, set()
            for i, (p, so) in enumerate(zip(prompts(len(CONSTRAINTS)), CONSTRAINTS)):
                eng.add_request(str(i), p, params(so))
            while eng.has_unfinished_requests():
                for out in eng.step():
                    got[int(out.request_id)] = list(out.outputs[0].token_ids)
                for rid, req in list(eng.scheduler.requests.items()):
                    if req.num_output_tokens >= 2 and rid not in done and eng.scheduler.preempt_request(rid):
                        done.add(rid)
            assert [got[i] for i in range(len(CONSTRAINTS))] == ref
            st = other.get_stats().scheduler
            assert (st.num_swap_preemptions if setting else st.num_recompute_preemptions) > 0
        clean(other)
    finally:
        other.shutdown()
